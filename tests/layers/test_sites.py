"""A model without layer sites: the message gives the plate advice, not the zero-noise text."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from stochmi.layers.sites import no_layers_message


def test_missing_plate_gets_plate_advice_only():
    def model(x):
        return pyro.sample("h", dist.Normal(x, 1.0).to_event(2))

    msg = no_layers_message(model, torch.randn(20, 3))
    assert "['h']" in msg and "pyro.plate" in msg
    assert "zero noise" not in msg and "infinite" not in msg


def test_deterministic_sites_get_zero_noise_paragraph():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            return pyro.deterministic("h", torch.tanh(x), event_dim=1)

    msg = no_layers_message(model, torch.randn(20, 3))
    assert "['h']" in msg and "infinite" in msg
