"""The `fasttune` command (also `python -m fasttune`).

    fasttune demo                                   LoRA fine-tune of the shipped tiny model on CPU (~1 minute)
    fasttune train config.yaml [--resume | --overwrite] [--set train.lr=1e-4] [--gpus N]
    fasttune chat --adapter runs/demo/adapter       interactive chat, the model's chat template
    fasttune generate --model PATH --prompt "..."   one-shot generation
    fasttune data preview config.yaml               the first rows as the model sees them, lengths, packing fill
    fasttune export ...  | doctor ... | compare ... | bench ...
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

EXIT_INTERRUPTED = 130


# ---- train ---------------------------------------------------------------------------------------------------

def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (sections model, lora, data, objective, train; see configs/*.yaml and "
                                  "`fasttune train --print-defaults`)", nargs="?")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from the newest checkpoint in train.output_dir (or from CHECKPOINT): same data "
                        "position, optimizer, scheduler and RNG, so the losses continue as if never stopped")
    p.add_argument("--overwrite", action="store_true",
                   help="train.output_dir holds a previous run: delete its checkpoints, metrics and adapter first "
                        "(without --resume or --overwrite such a folder is refused)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config value, e.g. --set train.max_steps=100 --set lora.r=8 (repeatable)")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="train on N GPUs of this machine: re-launches itself under torchrun (DDP); equivalent to "
                        "`torchrun --nproc_per_node N -m fasttune train CONFIG`")
    p.add_argument("--print-defaults", action="store_true",
                   help="print the full default config as YAML, each key with its meaning and allowed values, and exit")
    p.add_argument("--print-reference", action="store_true",
                   help="print the config reference as Markdown (docs/config.md) and exit")


def _gpus_ok(args) -> bool:
    """Whether `--gpus N` can run here; says why not (without this check N CPU processes would start silently).
    With model.device: cpu the N processes are asked for (gloo, e.g. to test multi-process training): said, allowed."""
    import torch

    from .train.config import ConfigError, TrainConfig

    n = args.gpus
    if n < 1:
        print(f"fasttune train: --gpus {n}: give the number of GPUs to train on (1 or more), or leave --gpus out",
              file=sys.stderr)
        return False
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible >= n:
        return True
    try:
        device = TrainConfig.from_yaml(args.config, overrides=args.overrides).model.device
    except ConfigError:
        return True  # the run reports the config error itself
    if device == "cpu":
        print(f"fasttune train: --gpus {n} with model.device: cpu: {n} CPU processes (gloo)", file=sys.stderr)
        return True
    if visible == 0:
        print(f"fasttune train: --gpus {n}, but torch sees no CUDA GPU here (a CPU-only torch build, or "
              "CUDA_VISIBLE_DEVICES hides them): leave --gpus out to train on the CPU, or set model.device: cpu to "
              f"run {n} CPU processes", file=sys.stderr)
    else:
        print(f"fasttune train: --gpus {n}, but only {visible} CUDA GPU(s) are visible: pass --gpus {visible} or "
              "fewer", file=sys.stderr)
    return False


def _run_train(args) -> int:
    from .train.config import ConfigError, TrainConfig

    if args.print_defaults or args.print_reference:
        from .train.config_docs import defaults_yaml, reference_markdown

        print(defaults_yaml() if args.print_defaults else reference_markdown(), end="")
        return 0
    if not args.config:
        print("fasttune train: a CONFIG file is required (see configs/ or --print-defaults)", file=sys.stderr)
        return 2
    if args.gpus is not None and "WORLD_SIZE" not in os.environ and not _gpus_ok(args):
        return 2
    if args.gpus and args.gpus > 1 and "WORLD_SIZE" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}",
               "-m", "fasttune", "train", args.config]
        for o in args.overrides:
            cmd += ["--set", o]
        if args.resume is True:
            cmd.append("--resume")
        elif args.resume:
            cmd += ["--resume", str(args.resume)]
        if args.overwrite:
            cmd.append("--overwrite")
        print("launching:", " ".join(cmd), flush=True)
        return subprocess.call(cmd)
    try:
        cfg = TrainConfig.from_yaml(args.config, overrides=args.overrides)
    except ConfigError as e:
        print(f"fasttune train: config error: {e}", file=sys.stderr)
        return 2
    from .data import DataError
    from .train import distributed
    from .models.checkpoint import CheckpointError
    from .train.checkpoint import DiskFull
    from .train.run_folder import RunFolderError
    from .train.trainer import OutOfMemory, TrainingDiverged, train

    try:
        result = train(cfg, resume=args.resume, overwrite=args.overwrite)
        code = EXIT_INTERRUPTED if result.interrupted else 0
    except DataError as e:  # names file, line/row and column: the message is the whole story, no traceback
        print(f"fasttune train: data error: {e}", file=sys.stderr)
        code = 2
    except ConfigError as e:  # a setting the model or data cannot take, found once they are loaded
        print(f"fasttune train: config error: {e}", file=sys.stderr)
        code = 2
    except RunFolderError as e:  # in use, holding another run, nothing to resume, a symlink: the message says what to do
        print(f"fasttune train: {e}", file=sys.stderr)
        code = 2
    except DiskFull as e:
        print(f"\nfasttune train: {e}", file=sys.stderr)
        code = 1
    except CheckpointError as e:  # a model folder or training checkpoint that is unsafe, corrupt or mismatched
        print(f"fasttune train: checkpoint error: {e}", file=sys.stderr)
        code = 2
    except (TrainingDiverged, OutOfMemory) as e:
        print(f"\nfasttune train: {e}", file=sys.stderr)
        code = 1
    finally:
        worker = distributed.cleanup()
    if worker:  # a torchrun worker: leave before interpreter shutdown can abort it (see exit_worker)
        distributed.exit_worker(code)
    return code


# ---- data ----------------------------------------------------------------------------------------------------

def _add_data(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    pv = sub.add_parser("preview", formatter_class=_HelpFormatter,
                        help="the first rows as the model will see them (trained tokens marked), the token-length "
                             "distribution and how the batches fill",
                        description="Render a training config's data as the run will: the first rows through its "
                                    "template and tokenizer, trained tokens marked; token lengths "
                                    "(min/median/p90/p99/max, truncated); packing (rows, fill %).")
    pv.add_argument("config", help="YAML training config (the same file `fasttune train` takes)")
    pv.add_argument("--rows", type=int, default=3, help="rows to render")
    pv.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="override a config value, as for train (repeatable)")
    pv.add_argument("--max-rows", type=int, default=None, metavar="N",
                    help="read at most N rows for the statistics (default: data.max_examples; streaming configs: "
                         "10,000)")
    pv.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                    help="colour the trained tokens (auto: when stdout is a terminal) instead of bracketing them")


def _run_data(args) -> int:
    from .data import DataError
    from .data.preview import preview
    from .models.checkpoint import CheckpointError
    from .train.config import ConfigError, TrainConfig

    if args.rows < 0 or (args.max_rows is not None and args.max_rows < 1):
        print("fasttune data preview: --rows must be >= 0 and --max-rows >= 1", file=sys.stderr)
        return 2
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    try:
        cfg = TrainConfig.from_yaml(args.config, overrides=args.overrides)
        preview(cfg, rows=args.rows, out=sys.stdout, color=color, max_rows=args.max_rows)
    except ConfigError as e:
        print(f"fasttune data preview: config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"fasttune data preview: data error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:  # the tokenizer's folder
        print(f"fasttune data preview: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # piped into head or a pager that quit: it has read what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
    return 0


# ---- chat / generate -------------------------------------------------------------------------------------------

def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="base model folder, or 'tiny' (default: the adapter's base model, "
                                                 "else tiny)")
    p.add_argument("--adapter", default=None,
                   help="trained weights: a run's adapter/ folder, one of its checkpoints/step-N folders, or a PEFT "
                        "adapter folder (e.g. from `fasttune export --format adapter`)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load a base model stored only as pytorch_model*.bin (pickle files can run code: trusted "
                        "files only)")
    p.add_argument("--chat-template", default=None,
                   help="registered template name (chatml, llama-3, mistral, gemma, phi-3, alpaca, vicuna, zephyr) "
                        "or Jinja source; default: the tokenizer's own (ChatML if it has none)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message is the whole story (what was wrong, what to do): printed as one line, no traceback."""
    from .adapters.peft import AdapterError
    from .models.checkpoint import CheckpointError

    return AdapterError, CheckpointError


def _load_for_inference(args):
    import torch

    from . import load
    from .build import base_model_dir, load_trained

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    allow_pickle = getattr(args, "allow_pickle", False)
    if args.adapter:
        return load_trained(args.adapter, base=args.model, device=device, dtype=args.dtype, allow_pickle=allow_pickle)
    folder = base_model_dir(args.model or "tiny", "given with --model" if args.model else "the default",
                            allow_pickle)
    model, tokenizer = load(folder, dtype=args.dtype, device=device, allow_pickle=allow_pickle)
    return model.eval(), tokenizer


def _session(args, model, tokenizer, system=None):
    from .chat import ChatSession
    from .build import adapter_meta

    template = args.chat_template
    if args.adapter:  # format prompts as the run formatted its training text, unless told otherwise
        meta = adapter_meta(args.adapter)
        template = template or meta.get("chat_template")
        system = system if system is not None else meta.get("system_prompt")
    return ChatSession(model, tokenizer, system=system, chat_template=template,
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       top_k=args.top_k, seed=args.seed)


def _add_chat(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt")


def _run_chat(args) -> int:
    from .chat import chat_loop

    try:
        model, tokenizer = _load_for_inference(args)
    except _user_errors() as e:
        print(f"fasttune chat: {e}", file=sys.stderr)
        return 2
    chat_loop(_session(args, model, tokenizer, system=args.system))
    return 0


def _add_generate(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text (repeatable); default: read one prompt per line from stdin")
    p.add_argument("--raw", action="store_true",
                   help="continue the text as-is instead of wrapping it in the chat template as a user turn")
    p.add_argument("--system", default=None, help="system prompt (chat mode)")


def _run_generate(args) -> int:
    try:
        model, tokenizer = _load_for_inference(args)
    except _user_errors() as e:
        print(f"fasttune generate: {e}", file=sys.stderr)
        return 2
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    session = _session(args, model, tokenizer, system=args.system)
    for prompt in prompts:
        if args.raw:
            print(session._generate(tokenizer(prompt)["input_ids"]))
        else:
            msgs = ([{"role": "system", "content": session.system}] if session.system else []) + [
                {"role": "user", "content": prompt}]
            print(session.complete(msgs))
    return 0


# ---- demo / bench ----------------------------------------------------------------------------------------------

def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60, about a minute on CPU)")
    p.add_argument("--output-dir", default="runs/demo", help="where the adapter, metrics and loss curve go")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar: one plain line per step instead")


def _run_demo(args) -> int:
    from .train.demo import run_demo

    run_demo(output_dir=args.output_dir, steps=args.steps, device=args.device, seed=args.seed,
             progress=not args.no_progress)
    return 0


def _bench_dir() -> Path | None:
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (base / "bench").is_dir():
            return base / "bench"
    return None


def _add_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("script", nargs="?", help="a benchmark in bench/ (name without .py); omit to list them")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments passed to the script")


def _run_bench(args) -> int:
    bench = _bench_dir()
    if bench is None:
        print("fasttune bench: the benchmarks live in the repository's bench/ folder, which this install does not "
              "have.\nClone the repository and run e.g. `python bench/train_speed.py --help` on a CUDA machine.")
        return 2
    scripts = sorted(p.stem for p in bench.glob("*.py") if not p.name.startswith("_"))
    if not args.script:
        print(f"benchmarks in {bench} (run: fasttune bench NAME [ARGS], results go to bench/RESULTS.md):")
        for s in scripts:
            print(f"  {s}")
        return 0
    if args.script not in scripts:
        print(f"fasttune bench: no benchmark {args.script!r}; available: {', '.join(scripts)}", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(bench / f"{args.script}.py"), *args.script_args])


# ---- parser ----------------------------------------------------------------------------------------------------

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says what the default is or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="fasttune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fasttune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help_text: str, add, run):
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=_HelpFormatter)
        add(p)
        p.set_defaults(func=run)

    command("demo", "LoRA fine-tune of the shipped tiny model on the bundled instructions (CPU, ~1 minute): loss "
                    "falling, adapter saved, answers before/after printed", _add_demo, _run_demo)
    command("train", "train from a YAML config: SFT, continued pre-training, reward model, DPO, ORPO",
            _add_train, _run_train)
    command("data", "look at a config's data before training: `fasttune data preview CONFIG`", _add_data,
            _run_data)
    command("chat", "interactive chat with a model (+ adapter) through its chat template", _add_chat, _run_chat)
    command("generate", "generate replies to prompts (arguments or stdin)", _add_generate, _run_generate)
    from .doctor.cli import add_compare_arguments, add_doctor_arguments, run_compare, run_doctor
    from .export.cli import add_arguments as add_export_arguments, run as run_export

    command("export", "export an adapter or merged model (Hugging Face safetensors, GGUF, Ollama Modelfile)",
            add_export_arguments, run_export)
    command("doctor", "check a model folder (and data) for known problems, optionally repair a copy",
            add_doctor_arguments, run_doctor)
    command("compare", "per-layer error between two implementations or checkpoints (e.g. fasttune vs transformers)",
            add_compare_arguments, run_compare)
    command("bench", "list or run the benchmarks in bench/ (CUDA)", _add_bench, _run_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    code = args.func(args)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
