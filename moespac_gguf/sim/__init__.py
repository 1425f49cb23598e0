"""The trace-driven simulator: routing traces (recorded through llama.cpp or imported from the
Mixtral traces), their statistics, device and model profiles, the replay of a residency policy
with its timing model, sweeps, and the self-draft's lookahead replayed over a trace."""
