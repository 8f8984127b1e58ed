"""The PRNG stream tags are distinct, so no two routines share random numbers."""
from trm_jax import streams


def test_top_level_stream_tags_are_distinct():
    tags = list(streams.TOP_LEVEL.values())
    assert len(set(tags)) == len(tags)
    assert streams.ATTACK != streams.SCRATCH != streams.META
