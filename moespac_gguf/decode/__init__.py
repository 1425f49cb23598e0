"""Decoding: the speculative loop (a draft proposes, the MoE target verifies in one batch), its
draft sources, sampling, adaptive draft length and statistics. The loop is also the runtime's
sensor: observers (core.events) hear every verification's routing."""
