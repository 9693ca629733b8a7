"""Train VATT with cross-modality gradient harmonization: ``[torchrun ...] python train.py [--config F] [--s.k=v]``."""
from harmony.trainer import main

if __name__ == "__main__":
    main()
