"""Putting a LoRA into a model: locating target layers, the runtime (apply/strength/remove/merge on a
live torch module, float or INT8), and merging into checkpoint files on disk.
"""
