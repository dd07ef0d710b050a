"""Denoisers: the contract (`base.Denoiser`) and the models exposed through it."""
