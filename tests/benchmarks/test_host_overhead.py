"""The host-overhead benchmark: the null UNet really runs the loop, and the JSON has a row per path/sampler/CFG."""

from __future__ import annotations

import json

import pytest
import torch

from sdtrt.benchmarks.host_overhead import HostConfig, NullUNet, main, make_case, run_block
from sdtrt.runtime.engine import Engine
from sdtrt.runtime.errors import ConfigError
from sdtrt.runtime.schedulers import SCHEDULER_NAMES, at_step, get_scheduler

SMALL = HostConfig(steps=4, schedule_steps=4, warmup=0, height=64, width=64)


def test_null_unet_is_an_engine_that_hands_back_its_sample():
    unet = NullUNet(torch.device("cpu"))
    sample = torch.randn(2, 4, 8, 8)
    assert isinstance(unet, Engine)
    assert unet.infer({"sample": sample})["noise_pred"] is sample


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_latents_evolve_exactly_as_the_sampler_alone_would(name, guided):
    case = make_case("cpu", name, guided, SMALL)
    schedule, sampler = case.denoiser.schedule, get_scheduler(name)
    latents, state = case.initial.clone(), torch.zeros_like(case.initial)
    for i in range(schedule.steps):  # noise_pred = the UNet's input; guidance of equal halves is the identity
        latents, state = sampler.step(schedule, i, latents * at_step(schedule.input_scale, i), latents, state)
    per_step, host = run_block(case)
    assert len(per_step) == len(host) == 4 and min(per_step) > 0
    assert not torch.equal(latents, case.initial)
    torch.testing.assert_close(case.denoiser.buffers.latents, latents, rtol=0, atol=0)
    run_block(case)  # a second block starts again from the same latents
    torch.testing.assert_close(case.denoiser.buffers.latents, latents, rtol=0, atol=0)


def test_json_has_one_row_per_path_sampler_and_guidance(tmp_path, capsys):
    out = tmp_path / "host.json"
    main(["--paths", "cpu", "--steps", "6", "--schedule-steps", "3", "--size", "64x64", "--json", str(out)])
    record = json.loads(out.read_text())
    rows = record["rows"]
    keys = [(r["path"], r["sampler"], r["guided"]) for r in rows]
    assert sorted(keys) == sorted(("cpu", s, g) for s in SCHEDULER_NAMES for g in (False, True))
    for row in rows:
        assert row["steps_timed"] == 6 and 0 < row["us_median"] <= row["us_p90"]
        assert row["latent_shape"] == [1, 4, 8, 8]
    assert record["env"]["torch"] and record["config"]["schedule_steps"] == 3
    assert "dpmpp_2m_karras" in capsys.readouterr().out


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="unknown path.*choose from cpu, cuda, cuda-graph"):
        HostConfig(paths=("gpu",))
    with pytest.raises(ConfigError, match="unknown sampler.*choose from euler"):
        HostConfig(samplers=("pndm",))
    with pytest.raises(SystemExit, match="multiples of 8"):
        main(["--size", "60x64", "--paths", "cpu"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="need a CUDA GPU"):
            HostConfig(paths=("cpu", "cuda-graph"))
    with pytest.raises(SystemExit, match=r"^error: cache interval must be an integer >= 1 .* got 0$"):
        main(["--paths", "cpu", "--cache-interval", "0"])
    with pytest.raises(SystemExit, match=r"^error: cache schedule must be one of uniform, quadratic, got 'cubic'$"):
        main(["--paths", "cpu", "--cache-interval", "3", "--cache-schedule", "cubic"])


CACHED = HostConfig(steps=6, schedule_steps=6, warmup=0, height=64, width=64, cache_interval=3)


@pytest.mark.parametrize("guided", [False, True])
def test_cached_loop_switches_between_two_step_functions_as_planned(guided):
    """Both null UNets hand back the sample, so the latents end as the uncached loop's; the plan picks the UNet."""
    plain, cached = make_case("cpu", "dpmpp_2m", guided, CACHED), make_case("cpu", "dpmpp_2m", guided, CACHED, 3)
    assert CACHED.plan == (True, False, False, True, False, True)
    calls = []
    for case, name in ((cached.denoiser, "unet"), (cached.denoiser.cache, "shallow")):
        engine = case.unet if name == "unet" else case.shallow
        original = engine.infer
        engine.infer = lambda feeds, original=original, name=name: (calls.append(name), original(feeds))[1]
    run_block(plain)
    per_step, host = run_block(cached)
    assert calls == ["unet", "shallow", "shallow", "unet", "shallow", "unet"]
    assert len(per_step) == len(host) == 6 and min(per_step) > 0
    assert not torch.equal(cached.denoiser.buffers.latents, cached.initial)
    torch.testing.assert_close(cached.denoiser.buffers.latents, plain.denoiser.buffers.latents, rtol=0, atol=0)
    feature = cached.denoiser.cache.feature
    assert feature.shape == (2 if guided else 1, 320, 8, 8)  # SD 1.5's at branch 0, one per UNet row


def test_cache_mode_rows_give_full_and_shallow_steps_apart(tmp_path, capsys):
    out = tmp_path / "host.json"
    main(["--paths", "cpu", "--samplers", "euler,dpmpp_2m", "--steps", "10", "--schedule-steps", "5",
          "--size", "64x64", "--cache-interval", "2", "--json", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    keys = sorted((r["sampler"], r["guided"], r["cache_interval"]) for r in rows)
    assert keys == sorted((s, g, n) for s in ("euler", "dpmpp_2m") for g in (False, True) for n in (1, 2))
    for row in rows:
        assert row["steps_timed"] == 10
        if row["cache_interval"] == 2:  # steps 0, 2, 4 of 5 full
            assert row["full_steps"] == 3 and row["us_median_full"] > 0 and row["us_median_shallow"] > 0
        else:
            assert "us_median_full" not in row
    printed = capsys.readouterr().out
    assert "cpu: one step function " in printed and "two chosen per step (N=2)" in printed


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["cuda", "cuda-graph"])
def test_cuda_paths_run_the_same_loop(path):
    case = make_case(path, "euler_a", True, SMALL)
    schedule, sampler = case.denoiser.schedule, get_scheduler("euler_a")
    latents, state = case.initial.clone(), torch.zeros_like(case.initial)
    for i in range(schedule.steps):
        latents, state = sampler.step(schedule, i, latents * at_step(schedule.input_scale, i), latents, state)
    for _ in range(2):  # the first block captures the graph, the second replays it
        per_step, host = run_block(case)
        assert len(per_step) == 4 and min(per_step) > 0 and min(host) > 0
        torch.testing.assert_close(case.denoiser.buffers.latents, latents, rtol=1e-6, atol=1e-6)
    assert (case.denoiser.graph is not None) == (path == "cuda-graph")


@pytest.mark.gpu
def test_cuda_graph_cached_loop_replays_two_graphs():
    plain, cached = make_case("cuda-graph", "euler", True, CACHED), make_case("cuda-graph", "euler", True, CACHED, 3)
    for _ in range(2):  # captures, then replays
        run_block(plain)
        run_block(cached)
        torch.testing.assert_close(cached.denoiser.buffers.latents, plain.denoiser.buffers.latents, rtol=0, atol=0)
    assert set(cached.denoiser.graphs) == {"full", "shallow"} and set(plain.denoiser.graphs) == {"full"}
