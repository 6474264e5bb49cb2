"""iterand_tune: reproduce and extend IteRand (Chijiwa et al., NeurIPS 2021) with Ray Tune."""
__version__ = "0.1.0"
