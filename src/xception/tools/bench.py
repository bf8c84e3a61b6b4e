"""`xception bench`: time our training or inference step against timm's legacy_xception in one process
(--mode train|infer), with each side's peak memory (CUDA max allocated, or the process's peak RSS on CPU;
--grad-checkpointing to compare), or the input pipeline (--mode data, databench.py); or, with --sync-debug,
count the host reads and CUDA syncs of our real training loop per step (syncdebug.py)."""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from ..config import MIN_INPUT_SIZE, Config, UserError
from ..engine.ema import Ema
from ..engine.mix import build_mix
from ..model.family import arch_info, build_arch
from ..model.deploy import META_KEY, compile_frozen, fold_batchnorm
from ..runtime import configure_kernels, resolve_device, synchronize
from .databench import print_data_bench, run_data_bench
from .servebench import print_serve_bench, run_serve_bench
from .syncdebug import count_syncs, summarize


def run(args) -> int:
    """Measure in the chosen mode, then print one JSON object (--json) or the mode's table; exit 1 when the
    load test saw errors."""
    if args.sync_debug:
        _check_sync_debug(args)
    _check_onnx(args)
    if args.mode == "data":
        result, show = run_data_bench(args), print_data_bench
    elif args.mode == "serve":
        result, show = run_serve_bench(args), print_serve_bench
    else:
        _check_sizes(args)
        result, show = _measure_compute(args, resolve_device(args.device)), _print_compute
    if args.json:
        print(json.dumps(result))
    else:
        show(result)
    return 1 if result.get("errors") else 0


def _check_sizes(args) -> None:
    for flag, value in (("--image-size", args.image_size - MIN_INPUT_SIZE + 1), ("--batch-size", args.batch_size),
                        ("--repeats", args.repeats), ("--steps", args.steps),
                        ("--threads", 1 if args.threads is None else args.threads)):
        if value < 1:
            raise UserError(f"{flag} is too small (image size at least {MIN_INPUT_SIZE}, the others at least 1)")


def _check_sync_debug(args) -> None:
    """--sync-debug runs the training loop eagerly and does not time: the flags it would ignore are refused."""
    if args.mode != "train":
        raise UserError(f"--sync-debug counts the syncs of the training loop: use it with --mode train, "
                        f"not --mode {args.mode}")
    for flag, on in (("--compile", args.compile), ("--profile", args.profile),
                     ("--grad-checkpointing", args.grad_checkpointing)):
        if on:
            raise UserError(f"--sync-debug runs the eager training loop without timing it: drop {flag}")


PEAK_MEMORY_KINDS = {"cuda_max_allocated": "CUDA max allocated (tensors, not the allocator's cache)",
                     "cpu_peak_rss": "peak RSS of the process (interpreter and libraries included), per side"}


def _reset_peak_memory(device) -> None:
    """Start a new peak-memory measurement (see _peak_memory_mib)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "cpu":
        try:  # Linux: "5" sets the process's RSS high-water mark back to its current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass  # elsewhere the peak only grows: compare runs of separate processes


def _peak_memory_mib(device):
    """(MiB, kind) of the peak since _reset_peak_memory: on CUDA the caching allocator's maximum of allocated
    memory (`cuda_max_allocated`: tensors only, not its cache); on CPU the process's peak resident set
    (`cpu_peak_rss`: everything, the interpreter and libraries included), from /proc's VmHWM, which the reset
    clears, else getrusage's ru_maxrss (KiB on Linux), which only grows. (None, None) on other devices."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "cuda_max_allocated"
    if device.type != "cpu":
        return None, None
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024, "cpu_peak_rss"


def _time_model(model, args, device, channels_last: bool, train: bool, compile: bool = False,
                profile: bool = False) -> dict:
    """Median/min/max img/s over `repeats` timed runs of `steps` steps, after `warmup` untimed steps, and the
    peak memory of all of them (`peak_mem_mib`, from the model's placement on; see _peak_memory_mib).
    With `compile`, the first step compiles; its time less one ordinary step is `compile_seconds`.
    With `profile`, two more steps run under torch.profiler and `profile` holds its table."""
    _reset_peak_memory(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=fmt)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(args.dtype)
    impl = {"foreach": dict(foreach=True), "fused": dict(fused=True), "for-loop": dict(foreach=False)}
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4, **impl[args.optimizer_impl])

    mix = build_mix(Config(mixup=args.mixup, cutmix=args.cutmix), 1000) if train else None

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            if not train:
                with torch.inference_mode():
                    return model(x)
            images, targets = mix(x, y) if mix is not None else (x, y)  # --mixup/--cutmix: soft targets
            loss = torch.nn.functional.cross_entropy(model(images), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train(train)
    if compile:
        model = torch.compile(model) if train else compile_frozen(model)
    synchronize(device)
    t0 = time.perf_counter()
    step()  # the first step: compiles when compiling
    synchronize(device)
    first_step = time.perf_counter() - t0
    for _ in range(max(args.warmup - 1, 1 if compile else 0)):
        step()
    rates = []
    for _ in range(args.repeats):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        synchronize(device)
        rates.append(args.steps * args.batch_size / (time.perf_counter() - t0))
    out = {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}
    out["peak_mem_mib"], out["peak_mem_kind"] = _peak_memory_mib(device)  # before profiling adds its own
    if profile:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(2):
                step()
            synchronize(device)
        out["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    if compile:
        out["compile_seconds"] = first_step - args.batch_size / out["median"]
    return out


def _ema_cost(model, args, device, step_seconds: float) -> dict:
    """The EMA update as training runs it (engine/ema.py, parameters and BatchNorm buffers), timed alone
    over repeats x steps updates, and as a percentage of our timed training step."""
    ema = Ema(model, SimpleNamespace(updates=0), decay=0.9998)
    ema.update()  # the first update only copies
    n = args.repeats * args.steps
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        ema.update()
    synchronize(device)
    seconds = (time.perf_counter() - t0) / n
    return {"ema_update_ms": 1000 * seconds, "ema_cost_pct": 100 * seconds / step_seconds}


def cpu_peak_gflops(threads: int):
    """fp32 peak of `threads` x86 cores from /proc/cpuinfo: clock x FMA width (AVX-512 64 FLOP/cycle, AVX2+FMA
    32, else 16). An estimate (turbo clocks, one FMA port on some parts); None where it cannot tell."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return None
    mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
    flags = next((line.split(":")[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    if not mhz or not flags:
        return None
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= set(flags) else 16
    return threads * mhz[0] / 1000 * per_cycle


def forward_gflop(image_size: int, arch: str = "xception") -> float:
    """GFLOP (2 per multiply-add) of one image's forward pass, counted by torch's FlopCounterMode."""
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        build_arch(arch, num_classes=1000)(torch.empty(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e9


def _timm_side(args, device, train: bool, result: dict) -> None:
    """timm's legacy_xception under the same settings, into `result` (or why it was skipped)."""
    try:
        import timm  # optional: the `bench` extra
    except ImportError:
        result["timm_skipped"] = "timm is not installed (pip install 'xception[bench]')"
        return
    name = arch_info(args.arch).timm_name  # the same network in timm
    theirs = timm.create_model(name, pretrained=False)
    checkpointing = train and args.grad_checkpointing and _timm_checkpointing(theirs)
    t = _time_model(theirs, args, device, args.timm_channels_last, train, args.timm_compile)
    result.update(timm_img_s=t["median"], timm_min=t["min"], timm_max=t["max"], ratio=result["ours_img_s"] / t["median"],
                  timm_peak_mem_mib=t["peak_mem_mib"],
                  timm_settings={"model": name, "channels_last": args.timm_channels_last,
                                 "compile": args.timm_compile, "grad_checkpointing": checkpointing,
                                 "optimizer": f"SGD momentum {args.optimizer_impl}" if train else None})
    result["timm_gflops"] = t["median"] * result["gflop_per_image"]  # the same arithmetic as ours
    if "compile_seconds" in t:
        result["timm_compile_seconds"] = t["compile_seconds"]


def _onnx_session(path: str, threads: int, image_size: int, batch_size: int):
    """(onnxruntime CPU session, input name, precision) of an --onnx file, or a one-line UserError."""
    if not os.path.isfile(path):
        raise UserError(f"--onnx {path}: no such file; give .onnx files written by `xception export --format onnx`")
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("--onnx needs onnxruntime (pip install onnxruntime)") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # the same thread count as the PyTorch sides
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for a file that is not a graph
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"--onnx {path}: onnxruntime cannot load it as an ONNX graph ({first})") from None
    inp = session.get_inputs()[0]
    size = inp.shape[-1] if isinstance(inp.shape[-1], int) else image_size
    batch = inp.shape[0] if isinstance(inp.shape[0], int) else batch_size
    if (size, batch) != (image_size, batch_size):
        raise UserError(f"--onnx {path}: its input is {inp.shape}, not {image_size} px at batch {batch_size}: export "
                        f"it with --image-size {image_size} (and without --static-batch) or bench with "
                        f"--image-size {size} -b {batch}")
    meta = json.loads(session.get_modelmeta().custom_metadata_map.get(META_KEY, "{}"))
    return session, inp.name, meta.get("precision", "fp32")


def _time_onnx(path: str, opened: tuple, args) -> dict:
    """One --onnx row: onnxruntime (CPU) img/s over the same batch shape, warmup, steps and repeats as ours."""
    session, name, precision = opened
    torch.manual_seed(0)
    feed = {name: torch.randn(args.batch_size, 3, args.image_size, args.image_size).numpy()}
    for _ in range(max(args.warmup, 1)):
        session.run(None, feed)
    rates = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            session.run(None, feed)
        rates.append(args.steps * args.batch_size / (time.perf_counter() - t0))
    return {"file": path, "precision": precision, "runtime": f"onnxruntime {_ort_version()} CPU",
            "img_s": statistics.median(rates), "min": min(rates), "max": max(rates)}


def _ort_version() -> str:
    import onnxruntime
    return onnxruntime.__version__


def _onnx_rows(args, sessions: list, result: dict) -> None:
    """--onnx FILE ...: a row per file in result["onnx"], each with its ratio to ours (PyTorch) and to the
    first fp32 file's (so that an INT8 row reads as its speed-up over the fp32 graph)."""
    rows = [_time_onnx(path, opened, args) for path, opened in zip(args.onnx, sessions)]
    base = next((r for r in rows if r["precision"] == "fp32"), None)
    for r in rows:
        r["ratio_to_ours"] = r["img_s"] / result["ours_img_s"]
        if base is not None and r is not base:
            r["ratio_to_fp32_onnx"] = r["img_s"] / base["img_s"]
    result["onnx"] = rows


def _check_onnx(args) -> None:
    if args.onnx and (args.mode != "infer" or resolve_device(args.device).type != "cpu" or args.dtype != "float32"):
        raise UserError("--onnx times onnxruntime on the CPU against our fp32 model: use it with --mode infer, "
                        "--device cpu and --dtype float32")


def _timm_checkpointing(model) -> bool:
    """Turn on timm's gradient checkpointing; False where the model has none (legacy_xception refuses it)."""
    try:
        model.set_grad_checkpointing(True)
    except (AssertionError, NotImplementedError):
        return False
    return True


def _memory(result: dict, side: str) -> str:
    mib = result.get(f"{side}_peak_mem_mib")
    return "" if mib is None else f", peak {mib:.0f} MiB"


def _print_compute(result: dict) -> None:
    if "sync_debug" in result:
        _print_sync_debug(result, result["device"])
    else:
        _print_table(result, result["device"])


def _print_table(result: dict, device: str) -> None:
    print(f"{result['mode']} {result['image_size']}px batch {result['batch_size']} {result['dtype']} on {device}, "
          f"{result['threads']} threads, torch {torch.__version__}")
    print(f"  ours : {result['ours_img_s']:8.2f} img/s (min {result['ours_min']:.2f}, max {result['ours_max']:.2f}), "
          f"{result['ours_gflops']:.1f} GFLOP/s at {result['gflop_per_image']:.2f} GFLOP/image"
          + (f", {100 * result['ours_fraction_of_peak']:.0f}% of a {result['peak_gflops']:.0f} GFLOP/s peak"
             if "peak_gflops" in result else "") + _memory(result, "ours"))
    if "timm_img_s" in result:
        print(f"  timm : {result['timm_img_s']:8.2f} img/s (min {result['timm_min']:.2f}, max {result['timm_max']:.2f})"
              + _memory(result, "timm"))
        print(f"  ratio: {result['ratio']:.3f}")
    else:
        print(f"  timm : skipped, {result['timm_skipped']}")
    if result.get("peak_mem_kind"):
        print(f"  peak memory: {PEAK_MEMORY_KINDS[result['peak_mem_kind']]}")
    if "ema_cost_pct" in result:
        print(f"  EMA update: {result['ema_update_ms']:.1f} ms, {result['ema_cost_pct']:.2f}% of our step")
    for r in result.get("onnx", ()):
        print(f"  onnx : {r['img_s']:8.2f} img/s (min {r['min']:.2f}, max {r['max']:.2f}), {r['precision']}, "
              f"{r['file']}; ratio {r['ratio_to_ours']:.3f} to ours"
              + (f", {r['ratio_to_fp32_onnx']:.3f} to the fp32 graph" if "ratio_to_fp32_onnx" in r else ""))
    for side in ("ours", "timm"):
        if f"{side}_compile_seconds" in result:
            print(f"  {side} torch.compile: {result[side + '_compile_seconds']:.1f} s, not in img/s")


def _print_sync_debug(result: dict, device: str) -> None:
    s = result["sync_debug"]
    print(f"sync debug: our training loop, {s['steps']} steps (print every {s['print_freq']}), "
          f"{result['image_size']}px batch {result['batch_size']} {result['dtype']} on {device}, "
          f"{result['ours_settings']['optimizer']}")
    print(f"  host reads: {s['host_reads_outside_print_steps']} outside print steps, "
          f"{s['host_reads_at_print_steps']} at print steps")
    if s["cuda_syncs_outside_print_steps"] is not None:
        print(f"  CUDA syncs: {s['cuda_syncs_outside_print_steps']} outside print steps, "
              f"{s['cuda_syncs_at_print_steps']} at print steps")
    print(f"  syncs per step outside print steps: {s['syncs_per_step']:.3f} (goal 0)")


def _measure_compute(args, device) -> dict:
    """The compute benchmark's figures (or --sync-debug's counts) as one JSON-ready dict."""
    train = args.mode == "train"
    if args.threads:
        torch.set_num_threads(args.threads)
    # As training sets up its device: cuDNN autotuning on CUDA (fixed shapes), unless --deterministic.
    configure_kernels(device, args.deterministic)
    result = {"mode": args.mode, "arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size,
              "dtype": args.dtype, "device": str(device), "torch_version": torch.__version__,
              "threads": torch.get_num_threads(), "cudnn_benchmark": torch.backends.cudnn.benchmark}
    if args.sync_debug:
        ledger, steps, result["ours_settings"], cuda = count_syncs(args, device)
        result["sync_debug"] = summarize(ledger, steps, cuda)
        return result
    # --onnx files are opened first, so that a bad one is refused before anything is timed
    sessions = [_onnx_session(path, result["threads"], args.image_size, args.batch_size) for path in args.onnx or ()]
    torch.manual_seed(0)
    ours = build_arch(args.arch, num_classes=1000)
    if not train and args.fold_bn:
        ours = fold_batchnorm(ours.eval())
    ours.set_grad_checkpointing(train and args.grad_checkpointing)
    result["ours_settings"] = {"channels_last": args.channels_last, "fold_bn": (not train) and args.fold_bn,
                               "compile": args.compile, "grad_checkpointing": train and args.grad_checkpointing,
                               "optimizer": f"SGD momentum {args.optimizer_impl}" if train else None,
                               "mixup": args.mixup, "cutmix": args.cutmix, "ema": train and args.ema}
    stats = _time_model(ours, args, device, args.channels_last, train, args.compile, profile=args.profile)
    result.update(ours_img_s=stats["median"], ours_min=stats["min"], ours_max=stats["max"],
                  ours_peak_mem_mib=stats["peak_mem_mib"], peak_mem_kind=stats["peak_mem_kind"])
    # A training step costs ~3 forward passes (forward, backward to activations, backward to weights).
    result["gflop_per_image"] = forward_gflop(args.image_size, args.arch) * (3 if train else 1)
    result["ours_gflops"] = result["ours_img_s"] * result["gflop_per_image"]
    peak = args.peak_gflops or (cpu_peak_gflops(result["threads"]) if device.type == "cpu" else None)
    if peak:
        result["peak_gflops"] = peak
        result["ours_fraction_of_peak"] = result["ours_gflops"] / peak
    if "compile_seconds" in stats:
        result["ours_compile_seconds"] = stats["compile_seconds"]
    if train and args.ema:
        result.update(_ema_cost(ours, args, device, args.batch_size / stats["median"]))
    del ours
    if sessions:
        _onnx_rows(args, sessions, result)
    _timm_side(args, device, train, result)
    if "profile" in stats:
        # the table goes to stderr, so that --json still prints exactly one JSON object on stdout
        print(f"torch.profiler, our {args.mode} step, 2 steps:\n{stats['profile']}", file=sys.stderr)
    return result
