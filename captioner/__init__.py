"""captioner: image captioning on the CPU with a pretrained CNN encoder, an attention LSTM and beam search.

    from captioner import Captioner
    cap = Captioner.load()                      # the shipped Flickr8k model
    print(cap.caption(["dog.jpg"])[0].text)
"""

from captioner.api import Alternative, Caption, Captioner
from captioner.config import ConfigError
from captioner.images import ImageLoadError
from captioner.models.checkpoint import CheckpointError

__all__ = ["Alternative", "Caption", "Captioner", "CheckpointError", "ConfigError", "ImageLoadError"]
__version__ = "0.1.0"
