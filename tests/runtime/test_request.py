"""The request rules shared by the pipeline, the CLI and the server: seeds, and checks before any engine opens."""

from __future__ import annotations

import pytest

from sdtrt.runtime.errors import ConfigError, ShapeError
from sdtrt.runtime.request import SEED_MAX, check_request, resolve_seed, seeds_per_image


def test_minus_one_and_none_are_random_seeds_in_range():
    drawn = {resolve_seed(-1) for _ in range(8)} | {resolve_seed(None) for _ in range(8)}
    assert len(drawn) > 1 and all(0 <= s <= SEED_MAX for s in drawn)
    assert resolve_seed(0) == 0 and resolve_seed(SEED_MAX) == SEED_MAX


@pytest.mark.parametrize("seed", [-2, SEED_MAX + 1, 2**64 - 1])
def test_seeds_outside_32_bits_are_refused(seed):
    with pytest.raises(ConfigError, match=f"seed must be -1 \\(random\\) or 0..{SEED_MAX}, got {seed}"):
        resolve_seed(seed)


def test_per_image_seeds_stay_in_range():
    assert seeds_per_image(SEED_MAX - 1, 2) == [SEED_MAX - 1, SEED_MAX]
    with pytest.raises(ConfigError, match=f"give a seed of at most {SEED_MAX - 2}"):
        seeds_per_image(SEED_MAX - 1, 3)
    with pytest.raises(ConfigError, match="got -1"):
        seeds_per_image([1, -1], 2)  # -1 means random only as the one seed of a call


def test_server_and_runtime_refuse_the_same_seeds():
    from sdtrt.serve.a1111 import parse_request
    from sdtrt.serve.errors import RequestError

    assert parse_request({"seed": -1}).seed is None and parse_request({"seed": SEED_MAX}).seed == SEED_MAX
    with pytest.raises(RequestError) as refused:
        parse_request({"seed": SEED_MAX + 1})
    with pytest.raises(ConfigError) as runtime:
        resolve_seed(SEED_MAX + 1)
    assert str(refused.value) == str(runtime.value)


def test_check_request_needs_only_the_manifest(tiny_fp32):
    from sdtrt.runtime.manifest import read_manifest

    manifest = read_manifest(tiny_fp32)
    ok = dict(steps=2, guidance_scale=7.5, seed=1, height=None, width=None, scheduler=None, num_images=1)
    check_request(manifest, "x", image=None, strength=0.8, **ok)
    with pytest.raises(ShapeError, match="steps must be an integer >= 1, got 0"):
        check_request(manifest, "x", image=None, strength=0.8, **{**ok, "steps": 0})
    with pytest.raises(ShapeError, match=r"strength must be in \(0, 1\], got 1.5"):
        check_request(manifest, "x", image=object(), strength=1.5, **ok)
    check_request(manifest, "x", image=None, strength=1.5, **ok)  # text-to-image ignores strength
    with pytest.raises(ConfigError, match="unknown scheduler 'nope'"):
        check_request(manifest, "x", image=None, strength=0.8, **{**ok, "scheduler": "nope"})
