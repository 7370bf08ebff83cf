"""The format-neutral LoRA model: adapters, modules and parts over lazy tensor sources, the layout
algorithms (fused native blocks <-> standard layers), and the one naming table of the DiT.
"""
