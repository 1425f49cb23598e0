"""The base of the package, with no llama.cpp in it: errors, sizes, paths, GGUF reading and the
expert layout, routing arrays, the decode loop's events, prompt files. Every other layer builds
on it; it imports nothing of theirs."""
