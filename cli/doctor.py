"""``sdtrt doctor``: versions, the GPUs, the TensorRT extra that fits, and which backends can run here."""

from __future__ import annotations

import click


@click.command("doctor")
def doctor_cmd() -> None:
    """Show versions, the GPU, and which backends can run here."""
    from sdtrt.runtime.backends.trt_compat import extra_advice
    from sdtrt.runtime.engine import BACKENDS, get_backend
    from sdtrt.runtime.environment import gather_environment

    env = gather_environment()
    rows = [
        ("python", env.python),
        ("sdtrt", env.sdtrt or "?"),
        ("torch", f"{env.torch} (CUDA {env.torch_cuda or 'none: CPU-only build'})"),
        ("trt extra", extra_advice()),
    ]
    for gpu in env.gpus:
        detail = f"{gpu.name}, compute capability {gpu.compute_capability}, {gpu.memory_gib:.1f} GiB"
        rows.append((f"GPU {gpu.index}", detail))
    if not env.gpus:
        rows.append(("GPU", "none visible to torch"))
    rows += [(name, library.describe()) for name, library in env.libraries.items()]
    for name, value in rows:
        click.echo(f"{name:<13} {value}")
    click.echo("backends:")
    for name in BACKENDS:
        try:
            usable, reason = get_backend(name).available()
        except Exception as exc:  # a backend that breaks while probing is reported, not raised
            usable, reason = False, f"{type(exc).__name__}: {exc}"
        click.echo(f"  {name:<12} " + ("usable" if usable else f"not usable: {reason}"))
