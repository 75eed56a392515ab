"""Reading and writing what csulora touches: safetensors files, checkpoints (local or Hub, lazily, one tensor at a
time), PEFT adapters, the map from model parameters to checkpoint tensors, adapter targets bound to a checkpoint,
and output folders written atomically.
"""
