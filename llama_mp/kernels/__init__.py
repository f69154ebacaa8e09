"""CPU decode kernels in C: building and loading them (cpu.py), the decoder that runs a step with them
(decoder.py), and their source (csrc/cpu_decode.c)."""
