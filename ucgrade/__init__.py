"""ucgrade: train and use a ResNet50 classifier for the endoscopic severity of ulcerative colitis."""

__version__ = "0.1.0"
