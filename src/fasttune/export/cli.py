"""`fasttune export --format adapter|merged|gguf [--adapter DIR] MODEL_DIR OUT_DIR`

MODEL_DIR is a Hugging Face model folder, or an adapter folder (adapter_config.json) whose
base_model_name_or_path names the base. The result is written to a temporary folder beside OUT_DIR and renamed
at the end, so an interrupted export never leaves a half-written folder that looks whole."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

# the GGUF tensor types (keys of gguf_writer.QUANT_TYPES, spelled out so `--help` works without the gguf package)
QUANT_NAMES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="base model folder (or an adapter folder)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output folder (must be empty or absent unless --force)")
    parser.add_argument("--format", required=True, choices=("adapter", "merged", "gguf"))
    parser.add_argument("--adapter", metavar="DIR", help="PEFT/fasttune LoRA adapter folder to apply")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32", "bf16", "fp16",
                                                                 "fp32"), help="merged: weight dtype")
    parser.add_argument("--quant", default="q8_0", choices=QUANT_NAMES, help="gguf: tensor type")
    parser.add_argument("--chat-template", help="registry chat template for the GGUF and the Ollama Modelfile")
    parser.add_argument("--system", help="system prompt for the Ollama Modelfile")
    parser.add_argument("--max-shard-size", default="5GB", help="merged: largest safetensors shard")
    parser.add_argument("--load-in-4bit", action="store_true", help="load the base in NF4 (the export then holds "
                                                                     "the dequantised 4-bit base)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _resolve(args) -> tuple[Path, Path | None]:
    model_dir, adapter = Path(args.model_dir), Path(args.adapter) if args.adapter else None
    if (model_dir / "adapter_config.json").exists() and not (model_dir / "config.json").exists():
        base = json.loads((model_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base or not Path(base).exists():
            raise SystemExit(f"{model_dir} is an adapter whose base_model_name_or_path ({base!r}) is not a local "
                             "folder: pass the base folder as MODEL_DIR and the adapter with --adapter")
        model_dir, adapter = Path(base), model_dir
    return model_dir, adapter


def run(args) -> int:
    from tqdm import tqdm

    import fasttune
    from ..data.chat_templates import TEMPLATES
    from .adapter import load_adapter, save_adapter
    from .merged import export_merged, iter_merged_tensors
    from .modelfile import ModelfileError, make_modelfile

    out = Path(args.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        print(f"error: {out} exists and is not empty; pass --force to replace it", file=sys.stderr)
        return 2
    if args.chat_template is not None and args.chat_template not in TEMPLATES:
        print(f"error: unknown --chat-template {args.chat_template!r}; choose one of {', '.join(sorted(TEMPLATES))}",
              file=sys.stderr)
        return 2
    if args.format == "gguf":
        try:
            from .gguf_writer import export_gguf, gguf_tensor_plan
        except ImportError as e:
            print(f"error: --format gguf needs the `gguf` package ({e}); install it with `pip install gguf` "
                  "(or `pip install fasttune[export]`)", file=sys.stderr)
            return 2
    model_dir, adapter = _resolve(args)
    if args.format == "adapter" and adapter is None:
        print("error: --format adapter needs an adapter (--adapter DIR or an adapter folder as MODEL_DIR)",
              file=sys.stderr)
        return 2
    # the checkpoint's own dtype: exact, and half the memory of float32; merging upcasts one tensor at a time
    model, tokenizer = fasttune.load(model_dir, device="cpu", load_in_4bit=args.load_in_4bit)
    if adapter is not None:
        load_adapter(model, adapter)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    notes: list[str] = []
    try:
        if args.format == "adapter":
            save_adapter(model, tmp, base_model_name_or_path=str(model_dir.resolve()))
        else:
            # one update per tensor written (merged: HF tensors; gguf: the plan, with Phi-3 fusions and RoPE factors)
            n = len(gguf_tensor_plan(model, args.quant)) if args.format == "gguf" else \
                sum(1 for _ in iter_merged_tensors(model))
            with tqdm(total=n, desc=f"export {args.format}", unit="tensor") as bar:
                step = lambda _name: bar.update(1)  # noqa: E731
                if args.format == "merged":
                    notes += export_merged(model, tmp, tokenizer=tokenizer, dtype=args.dtype,
                                           max_shard_size=args.max_shard_size, progress=step).notes
                    from_path = "."
                else:
                    template = TEMPLATES[args.chat_template].source if args.chat_template else None
                    gguf_name = f"{model_dir.name}-{args.quant}.gguf"
                    notes += export_gguf(model, tmp / gguf_name, tokenizer=tokenizer, quant=args.quant,
                                         chat_template=template, name=model_dir.name, progress=step).notes
                    from_path = f"./{gguf_name}"
            eos = tokenizer.eos_token or "</s>"
            try:
                text = make_modelfile(from_path, args.chat_template, eos_token=eos, system=args.system,
                                      jinja_source=getattr(tokenizer, "chat_template", None) or None)
                (tmp / "Modelfile").write_text(text)
            except ModelfileError as e:
                notes.append(f"no Ollama Modelfile written: {e}")
        if notes:
            (tmp / "EXPORT_NOTES.txt").write_text("\n".join(notes) + "\n")
        # the old OUT_DIR (--force) is moved aside, not deleted, until the new one is in place
        old = out.parent / f".{out.name}.old-{os.getpid()}" if out.exists() else None
        if old is not None:
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if old is not None:
                old.rename(out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(p for p in out.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    print(f"wrote {args.format} export to {out}:")
    for p in files:
        print(f"  {p.relative_to(out)}  {_human(p.stat().st_size)}")
    print(f"  total {_human(total)}")
    for note in notes:
        print(f"note: {note}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fasttune export", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
