"""The model stage: the pretrained encoder registry, the decoders, the vocabulary and the checkpoint format.

Nothing here imports the runtime, training or the user-facing surfaces; they all build on these modules.
"""
