"""llama-rig: provision and keep llama.cpp inference rigs."""

__version__ = "0.1.0"
