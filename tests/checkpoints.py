"""A real checkpoint round trip for resume tests."""

import io

import torch


def saved_and_loaded(**parts):
    """``parts`` (state dicts) through ``torch.save`` and ``torch.load(weights_only=True)``: a
    real checkpoint, nothing shared with the running objects, loadable without pickle."""
    buffer = io.BytesIO()
    torch.save(parts, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)
