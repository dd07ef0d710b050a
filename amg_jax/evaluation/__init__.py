"""Measuring samples the way the papers do: memorization metrics and Fréchet distances
(``metrics``), FID's Inception network (``inception``), the testbed's evaluation network
(``evalnet``) and the testbed's comparison protocol (``protocol``: prompts, seeds, references)."""
