"""composer on a GPU: the device's copy bandwidths, then the bench recipes with `--device cuda`, beside
`--device cpu` on the same machine and, when importable, mergekit with `--cuda`; each CUDA output is
checked against the CPU one.

    python bench/gpu.py --models /tmp/synth [--recipes linear,ties] [--no-cpu] [--no-mergekit]
        [--memory-budget 8GB] [--readers 1] [--deadline 480]

Models come from bench/synthetic.py (made when missing). "tensors/s" and "GB/s" are over composer's own
writing time (reading, computing, writing; planning and imports excluded); GB/s counts the input bytes
read plus the output bytes written, the traffic that crosses between host and device; the I/O floor
(bench/io_floor.py) is the time to read the inputs and write the output once, with no computing. Runs stop
starting once --deadline seconds have passed (device time is often lent by the minute).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from compare import compose_report, mergekit_command, mergekit_env, recipes, run_child, weights_files  # noqa: E402
from io_floor import io_floor  # noqa: E402


def _seconds(action, repeat: int = 5) -> float:
    import torch

    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        started = time.perf_counter()
        action()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def copy_bandwidths(size: int = 1 << 30) -> dict[str, float]:
    """GB/s of the copies a merge makes: host to device from ordinary and from pinned memory, device to
    host, and device to device (bytes read plus bytes written, as device memory bandwidth is quoted)."""
    import torch

    pageable = torch.empty(size, dtype=torch.uint8).fill_(1)
    pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True).fill_(1)
    device = torch.empty(size, dtype=torch.uint8, device="cuda").fill_(1)
    other = torch.empty_like(device)
    gb = size / 1e9
    return {
        "host to device (pageable)": gb / _seconds(lambda: device.copy_(pageable)),
        "host to device (pinned)": gb / _seconds(lambda: device.copy_(pinned, non_blocking=True)),
        "device to host (pageable)": gb / _seconds(lambda: pageable.copy_(device)),
        "device to host (pinned)": gb / _seconds(lambda: pinned.copy_(device, non_blocking=True)),
        "device to device (read + write)": 2 * gb / _seconds(lambda: other.copy_(device)),
    }


def compare_outputs(expected: Path, actual: Path) -> str:
    """How far `actual` is from `expected`, tensor by tensor: equal tensors, and the largest difference."""
    import torch
    from safetensors import safe_open

    equal = total = 0
    worst = 0.0
    differing = entries = 0
    for path in sorted(expected.glob("*.safetensors")):
        with safe_open(str(path), "pt") as left, safe_open(str(actual / path.name), "pt") as right:
            for name in left.keys():
                a, b = left.get_tensor(name).float(), right.get_tensor(name).float()
                total += 1
                if torch.equal(a, b):
                    equal += 1
                    entries += a.numel()
                    continue
                scale = a.abs().max().item() or 1.0
                worst = max(worst, (a - b).abs().max().item() / scale)
                differing += int((a != b).sum())
                entries += a.numel()
    return f"{equal}/{total} equal, {differing / max(entries, 1):.1e} of entries differ, worst {worst:.1e} of max |w|"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("/tmp/composer-bench-models"))
    parser.add_argument(
        "--recipes",
        default="",
        help="comma-separated name prefixes to run, in that order (default: all but the tiny one)",
    )
    parser.add_argument("--no-cpu", action="store_true")
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--memory-budget", default=None, help="passed to compose as --memory-budget")
    parser.add_argument(
        "--readers", default=None, help="passed to compose as --readers (its default follows the cores)"
    )
    parser.add_argument("--deadline", type=float, default=1e9, help="start no run after this many seconds")
    parser.add_argument("--in-child", nargs="+", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.in_child:
        return _child(arguments.in_child)
    started = time.perf_counter()
    # torch work happens in children: a child's peak RSS (from wait4) starts from its parent's memory at the fork
    subprocess.run([sys.executable, __file__, "--in-child", "bandwidths"])
    if not (arguments.models / "model-3" / "tokenizer.json").is_file():
        subprocess.run([sys.executable, str(BENCH / "synthetic.py"), str(arguments.models)], check=True)
    print(f"models ready after {time.perf_counter() - started:.0f} s", flush=True)
    work = arguments.models / "outputs"
    work.mkdir(parents=True, exist_ok=True)
    compose = [sys.executable, "-m", "composer.cli"]
    mergekit = None if arguments.no_mergekit else mergekit_env()
    chosen = [p.strip() for p in arguments.recipes.split(",") if p.strip()]
    rows = []
    found = [(name, entry) for name, entry in recipes(arguments.models).items() if not name.startswith("tiny")]
    if chosen:  # in the order asked for
        found = [(name, entry) for prefix in chosen for name, entry in found if name.startswith(prefix)]
    for name, (text, inputs) in found:
        if time.perf_counter() - started > arguments.deadline:
            print(f"deadline reached; {name} and later recipes not run", flush=True)
            break
        recipe = work / "recipe.yml"
        recipe.write_text(text)
        read_gb = sum(path.stat().st_size for path in weights_files(inputs)) / 1e9
        outs = {}
        # planning fills composer's cache of transformers' answers for this config, as a user's second run finds it
        run_child(compose + ["plan", str(recipe)])
        devices = ["cuda"] + ([] if arguments.no_cpu else ["cpu"])
        for device in devices:
            out = work / f"out-{device}"
            command = compose + [str(recipe), str(out), "--force", "--no-progress", "--device", device]
            command += ["--memory-budget", arguments.memory_budget] if arguments.memory_budget else []
            command += ["--readers", arguments.readers] if arguments.readers else []
            wall, rss, status, tail = run_child(command)
            parsed = compose_report(tail)
            if status != 0 or parsed is None:
                print(f"composer --device {device} failed on {name}:\n{tail}", flush=True)
                continue
            tensors, mb, seconds, device_gb = parsed
            seconds = max(seconds, 0.05)  # compose prints tenths of a second
            outs[device] = out
            rows.append(
                (
                    name,
                    f"composer {device}",
                    wall,
                    seconds,
                    tensors / seconds,
                    (read_gb + mb / 1e3) / seconds,
                    rss,
                    device_gb,
                )
            )
            print(_row(rows[-1]), flush=True)
        if outs:
            written = sum(path.stat().st_size for path in next(iter(outs.values())).glob("*.safetensors"))
            print(f"  {name}: I/O floor {io_floor(weights_files(inputs), written, work)['floor_s']:.1f} s", flush=True)
        if len(outs) == 2:
            subprocess.run(
                [sys.executable, __file__, "--in-child", "compare", name, str(outs["cpu"]), str(outs["cuda"])]
            )
        if mergekit is not None and time.perf_counter() - started < arguments.deadline:
            mk_out = work / "mergekit-out"
            shutil.rmtree(mk_out, ignore_errors=True)
            command = mergekit_command(name, recipe, mk_out) + ["--cuda"]
            wall, rss, status, tail = run_child(command, mergekit)
            if status != 0:
                print(f"mergekit --cuda failed on {name}:\n{tail[-800:]}", flush=True)
            else:
                rows.append((name, "mergekit cuda", wall, None, None, None, rss, None))
                print(_row(rows[-1]), flush=True)
            shutil.rmtree(mk_out, ignore_errors=True)
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
    print()
    print("| recipe | run | wall | writing | tensors/s | GB/s (read + written) | peak RSS | peak device memory |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(_row(row))


def _child(task: list[str]) -> None:
    if task[0] == "bandwidths":
        import torch

        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
        for name, rate in copy_bandwidths().items():
            print(f"  {name}: {rate:.1f} GB/s", flush=True)
    else:
        name, cpu, cuda = task[1:]
        print(f"  {name}: cuda against cpu: {compare_outputs(Path(cpu), Path(cuda))}", flush=True)


def _row(row) -> str:
    name, run, wall, seconds, per_second, rate, rss, device_gb = row
    cells = [
        name,
        run,
        f"{wall:.1f} s",
        f"{seconds:.1f} s" if seconds else "-",
        f"{per_second:.0f}" if per_second else "-",
        f"{rate:.2f}" if rate else "-",
        f"{rss:.2f} GB",
        f"{device_gb:.2f} GB" if device_gb else "-",
    ]
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
