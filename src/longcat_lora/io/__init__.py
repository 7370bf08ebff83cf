"""Bytes on disk: safetensors dtypes, the validating lazy reader, the streaming writer, outputs that never
clobber (atomic placement, path checks), bounded JSON, and signal handling. Knows nothing of LoRAs.
"""
