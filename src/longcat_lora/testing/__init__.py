"""Testing and demo scaffolding, not the product: a reference DiT in both namings, the official LoRA
semantics (the parity reference), full-structure fixture generators, and the demo.
"""
