"""`fasttune export --format adapter|merged|gguf [--adapter DIR] MODEL_DIR OUT_DIR`

MODEL_DIR is a Hugging Face model folder, or a folder of trained weights whose record names the base: a run's
adapter/ folder, one of its checkpoints/step-N folders, or a PEFT adapter folder (the same kinds --adapter takes).
Everything the run trained is exported: LoRA adapters, trained embeddings / LM head (PEFT: modules_to_save), a full
fine-tune's weights, and a reward model's head (merged: a <Family>ForSequenceClassification checkpoint; adapter:
PEFT's SEQ_CLS; GGUF is refused, it runs text generators). The result is written to a temporary folder beside
OUT_DIR and renamed at the end, so an interrupted export never leaves a half-written folder that looks whole;
OUT_DIR may not be, contain or lie inside an input folder (not even with --force)."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

# the GGUF tensor types (keys of gguf_writer.QUANT_TYPES, spelled out so `--help` works without the gguf package)
# (K-quant presets last: llama.cpp's per-tensor type mixes, q4_k_m being what Ollama pulls by default)
QUANT_NAMES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k", "q3_k_m",
               "q2_k")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="base model folder, GGUF file or Hub repo id "
                                                               "(org/name: the Hugging Face cache, else a download), "
                                                               "or an adapter folder")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output folder (must be empty or absent unless --force)")
    parser.add_argument("--format", required=True, choices=("adapter", "merged", "gguf"))
    parser.add_argument("--adapter", metavar="DIR", help="trained weights to apply: a run's adapter/ folder, one of "
                                                        "its checkpoints/step-N folders, or a PEFT adapter folder")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32", "bf16", "fp16",
                                                                 "fp32"), help="merged: weight dtype")
    parser.add_argument("--quant", default="q8_0", choices=QUANT_NAMES, help="gguf: tensor type")
    parser.add_argument("--chat-template", help="registry chat template for the GGUF and the Ollama Modelfile")
    parser.add_argument("--system", help="system prompt for the Ollama Modelfile")
    parser.add_argument("--max-shard-size", default="5GB", help="merged: largest safetensors shard")
    parser.add_argument("--load-in-4bit", action="store_true", help="load the base in NF4 (the export then holds "
                                                                     "the dequantised 4-bit base)")
    parser.add_argument("--allow-pickle", action="store_true", help="load a base stored only as pytorch_model*.bin "
                                                                     "(pickle files can run code: trusted files only)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _inputs(args) -> tuple[Path, Path | None, dict | None]:
    """(base model folder, trained-weights folder or None, its record or None), checked; raises AdapterError or
    CheckpointError saying what to pass instead."""
    from ..build import adapter_meta, base_model_dir
    from ..adapters.peft import AdapterError

    model_dir, adapter = Path(args.model_dir), Path(args.adapter) if args.adapter else None
    base: str | None = str(model_dir)
    if adapter is None and model_dir.is_dir() and not (model_dir / "config.json").is_file():
        base, adapter = None, model_dir  # trained weights as MODEL_DIR: their record names the base
    meta = adapter_meta(adapter) if adapter is not None else None
    if base is None and not meta["base_model"]:
        raise AdapterError(f"{adapter} does not name its base model: pass the base folder as MODEL_DIR and the "
                           "trained weights with --adapter")
    recorded = f"recorded in {adapter}" if base is None else "MODEL_DIR"
    folder = base_model_dir(base or meta["base_model"], recorded, args.allow_pickle)
    return folder, adapter, meta


def _overlap(out: Path, inputs: list[Path]) -> str | None:
    """Why OUT_DIR cannot be written (it is, holds or lies inside an input folder: writing it, or replacing it with
    --force, would destroy the input), or None."""
    o = out.resolve()
    for folder in inputs:
        i = folder.resolve()
        if o == i:
            return f"OUT_DIR {out} is the input folder {folder}"
        if i in o.parents:
            return f"OUT_DIR {out} is inside the input folder {folder}"
        if o in i.parents:
            return f"OUT_DIR {out} holds the input folder {folder} (replacing it would delete the input)"
    return None


def run(args) -> int:
    from tqdm import tqdm

    import fasttune
    from ..data.chat_templates import TEMPLATES
    from ..models import ArchSpec
    from ..models.checkpoint import CheckpointError, resolve_dtype
    from ..build import load_trained
    from ..adapters.peft import AdapterError, save_adapter
    from .merged import export_merged, iter_merged_tensors
    from .modelfile import ModelfileError, export_chat_template, make_modelfile

    out = Path(args.out_dir)
    if args.format == "gguf":
        try:
            from .gguf_writer import GGUFExportError, check_gguf_supported, export_gguf, gguf_tensor_plan
        except ImportError as e:
            print(f"error: --format gguf needs the `gguf` package ({e}); install it with `pip install gguf` "
                  "(or `pip install fasttune[export]`)", file=sys.stderr)
            return 2
    if args.chat_template is not None and args.chat_template not in TEMPLATES:
        print(f"error: unknown --chat-template {args.chat_template!r}; choose one of {', '.join(sorted(TEMPLATES))}",
              file=sys.stderr)
        return 2
    try:
        model_dir, adapter, meta = _inputs(args)
    except (AdapterError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    overlap = _overlap(out, [model_dir] + ([adapter] if adapter is not None else []))
    if overlap:
        print(f"error: {overlap}; choose an OUT_DIR outside the inputs (--force does not change this)",
              file=sys.stderr)
        return 2
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        print(f"error: {out} exists and is not empty; pass --force to replace it", file=sys.stderr)
        return 2
    if args.format == "adapter" and adapter is None:
        print("error: --format adapter needs an adapter (--adapter DIR or an adapter folder as MODEL_DIR)",
              file=sys.stderr)
        return 2
    if args.format == "adapter" and meta["lora"] is not None and not meta["lora"]["enabled"]:
        print(f"error: {adapter} holds a full fine-tune (lora.enabled: false, every weight trained): there is no "
              "adapter to export; use --format merged or --format gguf", file=sys.stderr)
        return 2
    reward = meta is not None and meta["objective"] == "reward"
    if args.format == "gguf" and reward:
        print(f"error: {adapter} is a reward model (a score head, not a language-model head), and GGUF / Ollama run "
              "text generators: export it with --format merged (a sequence-classification checkpoint transformers "
              "loads) or --format adapter (PEFT SEQ_CLS)", file=sys.stderr)
        return 2
    base_spec = ArchSpec.from_pretrained(model_dir)
    if args.format == "gguf":
        try:
            check_gguf_supported(base_spec)
        except GGUFExportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    # the checkpoint's own dtype: exact, and half the memory of float32; merging upcasts one tensor at a time
    dtype = resolve_dtype(None, base_spec)
    try:
        if adapter is not None:
            model, tokenizer = load_trained(adapter, base=str(model_dir), device="cpu", dtype=dtype,
                                            load_in_4bit=args.load_in_4bit, allow_pickle=args.allow_pickle)
        else:
            model, tokenizer = fasttune.load(model_dir, device="cpu", dtype=dtype, load_in_4bit=args.load_in_4bit,
                                             allow_pickle=args.allow_pickle)
    except (AdapterError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # one chat template everywhere (GGUF, Modelfile, the tokenizer's chat_template.jinja): --chat-template, else the
    # one the run trained with, else the tokenizer's
    try:
        chat = export_chat_template(args.chat_template, meta, tokenizer)
    except ModelfileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if chat.source is not None:
        tokenizer.chat_template = chat.source

    from ..train.run_folder import remove_stale_temp_dirs

    remove_stale_temp_dirs(out.parent)  # what killed exports left here (only folders whose writer is dead)
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
                    gguf_name = f"{model_dir.name}-{args.quant}.gguf"
                    notes += export_gguf(model, tmp / gguf_name, tokenizer=tokenizer, quant=args.quant,
                                         chat_template=chat.source, progress=step).notes
                    from_path = f"./{gguf_name}"
            eos = tokenizer.eos_token or "</s>"
            try:
                if model.score is not None:  # a reward model scores text; Ollama generates it
                    raise ModelfileError("a reward model (sequence classification) does not generate text")
                text = make_modelfile(from_path, chat.registry_name, eos_token=eos, system=args.system,
                                      jinja_source=chat.source)
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
