"""The judge stage: candidate against the live model and the base, then export and the llama.cpp fidelity check."""
