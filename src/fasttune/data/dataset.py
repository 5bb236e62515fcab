"""build_dataset: read -> format -> tokenise -> mask -> length policy -> seeded shuffle -> train/eval split.

    splits = build_dataset("data.jsonl", tokenizer, max_seq_length=1024, eval_fraction=0.05, seed=0)
    for batch in iter_batches(splits.train, packing=True, max_seq_length=1024, seed=epoch):
        ...
    print(splits.stats.summary())

Row kinds (kind="auto" decides from the first row): "chat" (a messages/conversations column, ShareGPT or OpenAI),
"instruction" (instruction / optional input / output / optional system columns; prompt with response, completion
or answer; or any columns through prompt_template and response_template), "text" (a text column, or plain-text files: continued pre-training, loss on all tokens).
Nothing is dropped silently: bad rows raise DataError unless on_error="skip", and every skipped, truncated or
dropped example is counted in `stats`.
"""
from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ..labels import count_target_tokens
from .chat_templates import ChatTemplate, get_chat_template
from .conversations import find_conversation_column, standardize_conversation
from .errors import DataError, Location
from .readers import MAX_FIELD_CHARS, MAX_LINE_BYTES, read_rows
from .template import PromptTemplate
from .tokenize import TRAIN_ON, char_limit, tokenize_conversation, tokenize_text

log = logging.getLogger("fasttune.data")

KINDS = ("auto", "chat", "instruction", "text")
OVERLONG = ("truncate", "drop")
DEFAULT_PROMPT_TEMPLATE = "{instruction}[[\n\n{input}]]"
DEFAULT_RESPONSE_TEMPLATE = "{output}"


@dataclass
class DataStats:
    rows_read: int = 0
    examples: int = 0
    skipped_rows: int = 0           # bad rows (and unreadable lines/records) skipped because on_error="skip"
    truncated: int = 0              # cut to max_seq_length
    dropped_overlong: int = 0       # over max_seq_length with overlong="drop"
    dropped_no_target: int = 0      # nothing left to learn from (e.g. the response was truncated away)
    tokens: int = 0
    target_tokens: int = 0
    skip_reasons: list[str] = field(default_factory=list)  # the first few, verbatim

    def summary(self) -> str:
        s = (f"{self.examples} examples from {self.rows_read} rows; {self.tokens} tokens, {self.target_tokens} "
             f"trained on")
        for name in ("skipped_rows", "truncated", "dropped_overlong", "dropped_no_target"):
            if getattr(self, name):
                s += f"; {name.replace('_', ' ')}: {getattr(self, name)}"
        return s

    def skip(self, error: DataError) -> None:
        """Count a row skipped under on_error="skip", keeping the first few reasons."""
        self.skipped_rows += 1
        if len(self.skip_reasons) < 5:
            self.skip_reasons.append(str(error))


@dataclass
class DataSplits:
    train: object            # list[dict] (or StreamingExamples when streaming=True)
    eval: object             # list[dict] (possibly empty) or StreamingExamples
    stats: DataStats
    kind: str
    chat_template: ChatTemplate | None


def _kind_of(row: dict, kind: str, text_column: str, conversation_column: str | None,
             prompt_template: str | None, location: Location) -> str:
    if kind != "auto":
        return kind
    if conversation_column or find_conversation_column(row):
        return "chat"
    if prompt_template or "instruction" in row or "prompt" in row:
        return "instruction"
    if text_column in row:
        return "text"
    raise DataError("cannot tell what kind of data this is", location=location, available=list(row.keys()),
                    hint=f"expected a 'messages'/'conversations' column, 'instruction' and 'output' columns, or a "
                         f"{text_column!r} column; or pass kind=... with prompt_template=/text_column=")


class _Pipeline:
    """Turns one (location, row) into one tokenised example; holds the per-dataset configuration."""

    def __init__(self, tokenizer, *, kind, chat_template, prompt_template, response_template, system_prompt,
                 text_column, conversation_column, train_on, max_seq_length, overlong, add_eos_to_text):
        if kind not in KINDS:
            raise DataError(f"unknown kind {kind!r}", column="kind", available=KINDS)
        if train_on not in TRAIN_ON:
            raise DataError(f"unknown train_on {train_on!r}", column="train_on", available=TRAIN_ON)
        if overlong not in OVERLONG:
            raise DataError(f"unknown overlong policy {overlong!r}", column="overlong", available=OVERLONG)
        if not isinstance(max_seq_length, int) or max_seq_length < 2:
            raise DataError(f"max_seq_length must be an integer >= 2, got {max_seq_length!r}")
        self.tokenizer, self.kind, self.train_on = tokenizer, kind, train_on
        self.text_column, self.conversation_column, self.system_prompt = text_column, conversation_column, system_prompt
        self.max_seq_length, self.overlong, self.add_eos_to_text = max_seq_length, overlong, add_eos_to_text
        self.chat_template_name = chat_template
        self.template: ChatTemplate | None = None
        self.prompt = PromptTemplate(prompt_template or DEFAULT_PROMPT_TEMPLATE)
        self.response = PromptTemplate(response_template or DEFAULT_RESPONSE_TEMPLATE)
        self.prompt_template_given = prompt_template is not None
        self.response_template_given = response_template is not None
        self.defaults_checked = False
        self._max_chars: int | None = None

    @property
    def max_chars(self) -> int:
        """Text beyond this many characters cannot reach max_seq_length tokens: cut before tokenising."""
        if self._max_chars is None:
            self._max_chars = char_limit(self.tokenizer, self.max_seq_length)
        return self._max_chars

    def _default_columns(self, row: dict) -> None:
        """prompt/response and prompt/completion tables need no templates (decided once, from the first row)."""
        self.defaults_checked = True
        if not self.prompt_template_given and "instruction" not in row and "prompt" in row:
            self.prompt = PromptTemplate("{prompt}")
        if not self.response_template_given and "output" not in row:
            for column in ("response", "completion", "answer"):
                if column in row:
                    self.response = PromptTemplate("{" + column + "}")
                    break

    def _chat_template(self) -> ChatTemplate:
        if self.template is None:
            name = self.chat_template_name
            if name is None and not getattr(self.tokenizer, "chat_template", None):
                name = "chatml"  # a base model's tokenizer: fall back to ChatML
            self.template = get_chat_template(name, self.tokenizer)
        return self.template

    def example(self, location: Location, row: dict) -> dict:
        if self.kind == "auto":
            self.kind = _kind_of(row, "auto", self.text_column, self.conversation_column,
                                 prompt_template=(self.prompt.source if self.prompt_template_given else None),
                                 location=location)
        if self.kind == "text":
            if self.text_column not in row:
                raise DataError(f"missing column {self.text_column!r}", location=location, column=self.text_column,
                                available=list(row.keys()))
            text = row[self.text_column]
            if not isinstance(text, str):
                raise DataError(f"non-string value of type {type(text).__name__}", location=location,
                                column=self.text_column)
            return tokenize_text(text, self.tokenizer, add_eos=self.add_eos_to_text, location=location,
                                 max_chars=self.max_chars)
        if self.kind == "chat":
            column = self.conversation_column or find_conversation_column(row)
            if column is None or column not in row:
                raise DataError("missing conversation column", location=location, column=column or "messages",
                                available=list(row.keys()))
            messages = standardize_conversation(row[column], location, column)
            if self.system_prompt and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": self.system_prompt}] + messages
        else:
            if not self.defaults_checked:
                self._default_columns(row)
            if self.response.source == DEFAULT_RESPONSE_TEMPLATE and "output" not in row:
                raise DataError("missing column 'output'", location=location, column="output",
                                available=list(row.keys()),
                                hint="name the answer column: data.response_template: '{your_column}' in the "
                                     "config (response_template= in Python)")
            messages = [{"role": "user", "content": self.prompt.format(row, location)},
                        {"role": "assistant", "content": self.response.format(row, location)}]
            system = row.get("system") if isinstance(row.get("system"), str) and row.get("system") else self.system_prompt
            if system:
                messages.insert(0, {"role": "system", "content": system})
        return tokenize_conversation(messages, self.tokenizer, self._chat_template(), train_on=self.train_on,
                                     location=location, max_chars=self.max_chars)

    def apply_length_policy(self, ex: dict, stats: DataStats) -> dict | None:
        n = len(ex["input_ids"])
        if n > self.max_seq_length:
            if self.overlong == "drop":
                stats.dropped_overlong += 1
                return None
            stats.truncated += 1
            ex = {"input_ids": ex["input_ids"][: self.max_seq_length], "labels": ex["labels"][: self.max_seq_length]}
        targets = count_target_tokens(ex["labels"])
        if targets == 0:
            stats.dropped_no_target += 1
            return None
        stats.examples += 1
        stats.tokens += len(ex["input_ids"])
        stats.target_tokens += targets
        return ex


def _examples(source, pipeline: _Pipeline, stats: DataStats, on_error: str, reader_kwargs: dict,
              max_rows: int | None, keep=None) -> Iterator[tuple[int, dict]]:
    """(row index, example) for every row that yields an example; `keep(index)` False: the row is read but not
    tokenised (a streaming pass over one split). With on_error="skip", lines and records the reader cannot make a
    row of are skipped and counted too."""
    on_bad_row = stats.skip if on_error == "skip" else None
    yield from examples_from_rows(read_rows(source, **reader_kwargs, on_bad_row=on_bad_row), pipeline, stats,
                                  on_error, max_rows, keep)


def examples_from_rows(rows: Iterable[tuple[Location, dict]], pipeline, stats: DataStats, on_error: str,
                       max_rows: int | None, keep=None) -> Iterator[tuple[int, dict]]:
    """The loop every dataset runs (single sequences here, chosen/rejected pairs in train.data): read at most
    `max_rows` rows, turn each into an example with `pipeline.example(location, row)`, skip and count the rows that
    raise a DataError with a location when on_error="skip" (a DataError without one is a config error: raised),
    and apply `pipeline.apply_length_policy(example, stats)` (None: dropped, counted there)."""
    for index, (location, row) in enumerate(rows):
        if max_rows is not None and index >= max_rows:
            break
        stats.rows_read += 1
        if keep is not None and not keep(index):
            continue
        try:
            ex = pipeline.example(location, row)
        except DataError as e:
            if on_error != "skip" or (e.file is None and e.line is None and e.row is None):  # config error
                raise
            stats.skip(e)
            continue
        ex = pipeline.apply_length_policy(ex, stats)
        if ex is not None:
            yield index, ex


def _lost(stats: DataStats) -> bool:
    """Whether any row was skipped, truncated or dropped (and so must be reported)."""
    return any(getattr(stats, n) for n in ("skipped_rows", "truncated", "dropped_overlong", "dropped_no_target"))


def _in_eval(index: int, seed: int, eval_fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < eval_fraction


class StreamingExamples:
    """A re-iterable, lazily tokenised stream (for files larger than memory). Shuffles within a buffer of
    `shuffle_buffer` examples (seeded by seed + epoch; call set_epoch each epoch); the eval split takes each row with
    probability eval_fraction from a hash of (seed, row index), so the split is the same on every pass."""

    def __init__(self, make_iter, split: str, eval_fraction: float, seed: int, shuffle: bool, shuffle_buffer: int,
                 stats: DataStats):
        self._make_iter, self.split, self.eval_fraction = make_iter, split, eval_fraction
        self.seed, self.shuffle, self.shuffle_buffer, self.stats, self.epoch = seed, shuffle, shuffle_buffer, stats, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        want_eval = self.split == "eval"
        if want_eval and not self.eval_fraction:
            return
        rng = random.Random(self.seed + self.epoch)
        buffer: list[dict] = []
        self.stats.__init__()  # counts describe the latest pass (all rows read, both splits' rows included)
        keep = (lambda i: _in_eval(i, self.seed, self.eval_fraction) == want_eval) if self.eval_fraction else None
        for index, ex in self._make_iter(self.stats, keep):  # the other split's rows are never tokenised
            if not self.shuffle or want_eval:
                yield ex
                continue
            if len(buffer) < self.shuffle_buffer:
                buffer.append(ex)
                continue
            j = rng.randrange(len(buffer))
            yield buffer[j]
            buffer[j] = ex
        rng.shuffle(buffer)
        yield from buffer
        if not want_eval and _lost(self.stats):  # a whole pass is done: report what was cut, dropped or skipped
            log.warning("data (streaming pass, epoch %d): %s", self.epoch, self.stats.summary())


def build_dataset(source, tokenizer, *, kind: str = "auto", chat_template: str | None = None,
                  prompt_template: str | None = None, response_template: str | None = None,
                  system_prompt: str | None = None, text_column: str = "text", conversation_column: str | None = None,
                  train_on: str = "responses", max_seq_length: int = 2048, overlong: str = "truncate",
                  on_error: str = "raise", shuffle: bool = True, seed: int = 0, eval_fraction: float = 0.0,
                  eval_size: int | None = None, streaming: bool = False, shuffle_buffer: int = 10_000,
                  max_rows: int | None = None, add_eos_to_text: bool = True, format: str | None = None,
                  text_split: str = "paragraph", sheet: str | None = None, encoding: str = "utf-8",
                  max_line_bytes: int = MAX_LINE_BYTES, max_field_chars: int = MAX_FIELD_CHARS) -> DataSplits:
    """Read, format, tokenise and split a dataset. See the module docstring; returns DataSplits(train, eval, stats).

    source: a file (.jsonl .json .csv .tsv .parquet .xlsx .txt/.md), a folder of text files, a list of dicts, a pandas
        DataFrame or a datasets.Dataset.
    chat_template: registered name, Jinja string, "tokenizer", or None (the tokenizer's own, else ChatML).
    train_on: "responses" (assistant turns only) or "all". Plain text always trains on all tokens.
    overlong: "truncate" (count in stats.truncated) or "drop" (stats.dropped_overlong) for > max_seq_length.
    on_error: "raise" (default) or "skip" (bad rows counted in stats.skipped_rows, first reasons in skip_reasons).
    eval_fraction / eval_size: hold out that share / that many examples (after the seeded shuffle).
    streaming: tokenise lazily on each pass (StreamingExamples); eval_size is not available, use eval_fraction.
    max_line_bytes / max_field_chars: the most one row (a line, a JSON array element) / one value may take; over
        them a row is a DataError (skipped and counted with on_error="skip"). Defaults far above real data.
    """
    if on_error not in ("raise", "skip"):
        raise DataError(f"unknown on_error {on_error!r}", column="on_error", available=["raise", "skip"])
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    pipeline = _Pipeline(tokenizer, kind=kind, chat_template=chat_template, prompt_template=prompt_template,
                         response_template=response_template, system_prompt=system_prompt, text_column=text_column,
                         conversation_column=conversation_column, train_on=train_on, max_seq_length=max_seq_length,
                         overlong=overlong, add_eos_to_text=add_eos_to_text)
    if chat_template is not None:
        pipeline._chat_template()  # an unknown template name fails now, before reading any data
    stats = DataStats()
    for name, limit in (("max_line_bytes", max_line_bytes), ("max_field_chars", max_field_chars)):
        if not isinstance(limit, int) or limit < 1:
            raise DataError(f"{name} must be a positive integer, got {limit!r}")
    reader_kwargs = dict(format=format, text_split=text_split, sheet=sheet, encoding=encoding,
                         max_line_bytes=max_line_bytes, max_field_chars=max_field_chars)

    if streaming:
        if eval_size:
            raise DataError("eval_size needs the whole dataset in memory; with streaming=True use eval_fraction")

        def make_iter(pass_stats: DataStats, keep):
            return _examples(source, pipeline, pass_stats, on_error, reader_kwargs, max_rows, keep)

        skipped = DataStats().skip if on_error == "skip" else None  # counted when the pass reads them
        location, first = next(iter(read_rows(source, **reader_kwargs, on_bad_row=skipped)))  # missing/empty?
        try:
            pipeline.example(location, first)  # decides kind="auto" now, and fails early on a bad first row
        except DataError:
            if on_error != "skip":
                raise
        train = StreamingExamples(make_iter, "train", eval_fraction, seed, shuffle, shuffle_buffer, stats)
        evals = StreamingExamples(make_iter, "eval", eval_fraction, seed, False, shuffle_buffer, DataStats())
        template = pipeline._chat_template() if pipeline.kind != "text" else None
        return DataSplits(train, evals, stats, pipeline.kind, template)  # stats fill in as train is iterated

    examples = [ex for _, ex in _examples(source, pipeline, stats, on_error, reader_kwargs, max_rows)]
    if not examples:
        raise DataError(f"no usable examples ({stats.summary()})",
                        file=str(source) if isinstance(source, str) else None,
                        hint="; ".join(stats.skip_reasons[:1]) or "check max_seq_length and the data")
    if shuffle:
        random.Random(seed).shuffle(examples)
    n_eval = eval_size if eval_size is not None else int(round(len(examples) * eval_fraction))
    if n_eval >= len(examples):
        raise DataError(f"eval split of {n_eval} examples leaves none to train on ({len(examples)} examples)")
    evals, train = examples[:n_eval], examples[n_eval:]
    if _lost(stats):
        log.warning("data: %s", stats.summary())
    return DataSplits(train, evals, stats, pipeline.kind,
                      pipeline.template if pipeline.kind != "text" else None)
