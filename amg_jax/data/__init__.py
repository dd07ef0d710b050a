"""Data: the procedural captioned testbed (``testbed``)."""
from amg_jax.data.testbed import (  # noqa: F401
    AttributeClassifier,
    Testbed,
    TestbedConfig,
    attribute_classifier,
    calibrate_copy_threshold,
    fresh_renders,
    full_captions,
    make_testbed,
    prompts_by_kind,
    render,
)
