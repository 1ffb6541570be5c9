"""Causal language modelling: learn to continue a prompt with its response.

Data comes in three shapes, read from its columns (``peftkit.data.load_text_data``) and carried
on the data as its ``shape``:

* a prompt and a response column (``--text-column`` / ``--response-column``, or guessed:
  prompt/instruction/question/input/text and response/output/completion/answer): the loss is on the
  response tokens only (the prompt is context, not something to learn to write);
* a labelled dataset (a text and a label column, as for classification): phrased as a completion
  task, ``"Review: {text} ... Answer:"`` -> ``" positive"``, so the label's name is the answer;
* one text column: plain language modelling over the whole text.

Evaluation: per-token loss and perplexity of the responses every epoch (cheap, picks the best
epoch); on the test split also the exact match of the greedily generated answer with the reference,
which for a labelled dataset is its classification accuracy (reported as ``accuracy`` too). The
generation itself (the exact match, ``predict``'s completions) is in ``peftkit.tasks.generation``.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import chunked_loss
from ..data import (
    PROMPT_COLUMN_GUESSES,
    TEXT_COLUMN_GUESSES,
    Shape,
    load_text_data,
    prompt_template_for,
    relabel,
    whole_data,
)
from ..errors import PeftkitError
from ..models import load_pretrained, load_tokenizer
from ..packing import collate_packed, pack_examples
from ..predict_io import GenerationOptions
from . import register_task
from .base import StepLoss, Task, TaskData, TaskSpec, Verdict, in_split_order, map_splits
from .generation import IGNORE, encode_prompts, exact_matches, generate, matching_label

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from ..config import RunConfig


# how the run's recorded split describes each shape of data
_SHAPE_WORDS = {
    Shape.PROMPT_RESPONSE: "prompt and response",
    Shape.PLAIN_TEXT: "plain text",
    Shape.LABELLED: "labelled data phrased as completion",
}


def _phrased(data: TaskData, source: str, template: str | None = None) -> TaskData:
    """Labelled data as a completion task: ``"Review: {text} ... Answer:"`` -> ``" positive"``
    (``template``: the one an adapter learned; None: the dataset's own)."""
    import datasets

    template = template or prompt_template_for(source)
    names = data.label_names or []

    def phrase(row: dict[str, Any]) -> dict[str, str]:
        return {"prompt": template.format(text=row["text"]), "response": " " + names[row["label"]]}

    splits = {k: ds.map(phrase, remove_columns=ds.column_names) for k, ds in data.splits.items()}
    data.split_info.update(shape=_SHAPE_WORDS[Shape.LABELLED], prompt_template=template)
    # replace keeps what the loader found to say (its notes) and the source's columns
    return dataclasses.replace(data, splits=datasets.DatasetDict(splits), label_names=names, shape=Shape.LABELLED)


@register_task
class CausalLM(Task):
    name = "causal-lm"
    description = (
        "Continue a prompt with its response (AutoModelForCausalLM); perplexity, exact match of generated answers."
    )
    default_model = "smollm2"
    default_dataset = "rotten_tomatoes"
    default_max_length = 128
    selection_metric = "loss"  # lower is better: ``score`` negates it
    headline_metrics = ("perplexity", "exact_match")
    input_columns = (*PROMPT_COLUMN_GUESSES, *TEXT_COLUMN_GUESSES)
    generates = True
    needs_zero_shot_reference = True  # ``learned`` compares perplexity with the untrained model's
    supports_chunked_loss = True  # vocabulary-wide logits: the chunked loss is the default where it applies
    supports_packing = True  # examples of varied length: several share a row (peftkit.packing)

    def accepts_model(self, model_task: Task) -> bool:
        """Only a model that generates: a sequence classifier's or an encoder's base cannot."""
        return model_task.name == self.name

    def score(self, metrics: dict[str, float]) -> float:
        return -metrics["loss"]

    # -- data ------------------------------------------------------------------------------------
    def load_data(self, cfg: RunConfig) -> TaskData:
        """The data in the shape its columns say (``peftkit.data.load_text_data``); labelled data
        is phrased as prompts whose answers are the label names."""
        data = load_text_data(
            cfg.dataset, cfg.text_column, cfg.label_column, cfg.response_column, cfg.seed, cfg.max_train_samples
        )
        return self._shaped(data, cfg.dataset)

    @staticmethod
    def _shaped(data: TaskData, source: str, template: str | None = None) -> TaskData:
        """``data`` with its shape recorded, labelled data phrased as prompts (``_phrased``)."""
        if data.shape is not Shape.LABELLED:
            data.split_info["shape"] = _SHAPE_WORDS[data.shape]
            return data
        return _phrased(data, source, template)

    def evaluation_data(self, cfg: RunConfig, metadata: dict[str, Any]) -> TaskData:
        """The whole file, labelled data phrased with the prompt the adapter learned (so that its
        answers can match) and its labels checked against the adapter's."""
        with whole_data():
            data = load_text_data(cfg.dataset, cfg.text_column, cfg.label_column, cfg.response_column, cfg.seed)
        data = relabel(data, metadata.get("label_names"), cfg.dataset)
        return self._shaped(data, cfg.dataset, metadata.get("prompt_template"))

    def baseline(self, data: TaskData) -> dict[str, Any] | None:
        """Always the most frequent answer of the test split (the first seen on a tie): its exact
        match (and accuracy, for labelled data). None for plain text, which has no answers."""
        answers = [r.strip() for r in data.splits["test"]["response"]]
        if data.shape is Shape.PLAIN_TEXT or not answers:
            return None
        answer, count = Counter(answers).most_common(1)[0]
        out: dict[str, Any] = {"name": "majority answer", "predicts": answer, "exact_match": count / len(answers)}
        if data.shape is Shape.LABELLED:
            out["accuracy"] = out["exact_match"]  # as evaluate reports it
        return out

    def learned(
        self, measured: dict[str, dict[str, float]], data: TaskData, zero_shot: dict[str, float] | None = None
    ) -> Verdict | None:
        """The selected epoch's validation loss against the untrained model's (``zero_shot``,
        measured on the same validation split before the first step): not below it means training
        made the model no better at writing the responses (learned nothing, or undid what it
        knew). None where no zero-shot loss was measured (a run resumed from an older checkpoint)."""
        after = (measured.get("validation") or {}).get("loss")
        before = (zero_shot or {}).get("loss")
        if after is None or before is None:
            return None
        ppl_before, ppl_after = math.exp(min(before, 50.0)), math.exp(min(after, 50.0))
        record = {
            "name": "zero-shot",
            "judged_on": "validation",
            "validation": {"loss": before, "perplexity": ppl_before},
        }
        if after < before:
            return Verdict(
                True, record, f"validation perplexity {ppl_after:.2f} is below the untrained model's {ppl_before:.2f}"
            )
        word = "worse than" if after > before else "no better than"
        return Verdict(
            False,
            record,
            f"validation perplexity {ppl_after:.2f} is {word} the untrained (zero-shot) model's {ppl_before:.2f}",
            worse=after > before,
        )

    def load_processor(self, model: str) -> Any:
        return load_tokenizer(model)

    def load_model(self, model: str, data: TaskData, processor: Any, quantize: str | None, precision: str) -> nn.Module:
        from transformers import AutoModelForCausalLM

        # the output layer stays unquantized: it is (often) the input embeddings too, and head_only trains it
        return load_pretrained(
            model,
            AutoModelForCausalLM,
            "a causal language model",
            quantize,
            precision,
            keep_unquantized=["lm_head"],
            pad_token_id=processor.pad_token_id,
        )

    def spec(self, model: nn.Module, data: TaskData) -> TaskSpec:
        names = tuple(data.label_names or ())
        # no new head: the output layer is pretrained, and trains only where a strategy says so
        return TaskSpec(
            num_labels=len(names), label_names=names, kind=self.name, head_modules=(), peft_task_type="CAUSAL_LM"
        )

    def encode(self, data: TaskData, processor: Any, cfg: RunConfig) -> dict[str, Any]:
        tok = processor
        if tok.eos_token_id is None:
            raise PeftkitError("causal-lm needs a tokenizer with an end-of-sequence token")
        limit = cfg.max_length

        def encode(batch: dict[str, list], idx: list[int], start: int) -> dict[str, Any]:
            prompts = tok(batch["prompt"], add_special_tokens=True)["input_ids"]
            responses = tok(batch["response"], add_special_tokens=False)["input_ids"]
            out: dict[str, list] = {
                "input_ids": [],
                "attention_mask": [],
                "labels": [],
                "length": [],
                "example_key": [],
            }
            for i, (p, r) in zip(idx, zip(prompts, responses)):
                r = (r + [tok.eos_token_id])[:limit]
                p = p[len(p) - (limit - len(r)) :] if len(p) + len(r) > limit else p  # keep the prompt's end
                ids = p + r
                out["input_ids"].append(ids)
                out["attention_mask"].append([1] * len(ids))
                out["labels"].append([IGNORE] * len(p) + r)
                out["length"].append(len(ids))
                out["example_key"].append(start + i)
            return out

        splits = map_splits(data.splits, encode)
        if cfg.levers.packing:  # several whole examples a row (validation and test stay per example)
            splits["train"] = pack_examples(splits["train"], limit)
        return splits

    def collate(self, processor: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """Pad on the left, so every row's answer ends at the last position: the model then
        computes vocabulary-wide logits only for the last ``logits_to_keep`` positions (those that
        predict answer tokens), not for every prompt token: the output layer is a fifth of a
        small LM's compute, and batch x length x vocabulary logits are gigabytes. Packed rows
        (``--packing``, they carry ``position_ids``) are collated by ``packing.collate_packed``.
        No cache is made: training and evaluation never reuse one."""
        import torch

        pad = processor.pad_token_id

        def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
            if "position_ids" in rows[0]:
                return collate_packed(rows, pad)
            width = max(len(r["input_ids"]) for r in rows)

            def padded(key: str, value: int) -> torch.Tensor:
                return torch.stack(
                    [
                        torch.cat(
                            [
                                torch.full((width - len(r[key]),), value, dtype=torch.long),
                                torch.as_tensor(r[key], dtype=torch.long),
                            ]
                        )
                        for r in rows
                    ]
                )

            labels = padded("labels", IGNORE)
            mask = padded("attention_mask", 0)
            answer = int((labels != IGNORE).sum(1).max())
            return {
                "input_ids": padded("input_ids", pad),
                "attention_mask": mask,
                "labels": labels,
                # positions count real tokens only, as generate() counts them for left padding
                "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
                "logits_to_keep": min(width, answer + 1),
                "use_cache": False,
                "example_key": torch.tensor([int(r["example_key"]) for r in rows]),
            }

        return collate

    # -- learning and measuring ----------------------------------------------------------------
    @staticmethod
    def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per example: summed loss of its labelled tokens (position t predicts token t+1), and how
        many there are. ``logits`` may cover only the last positions (``logits_to_keep``); only the
        labelled ones are cast to fp32."""
        import torch
        import torch.nn.functional as F

        kept = logits.shape[1]
        target = labels[:, labels.shape[1] - kept :][:, 1:]
        keep = target != IGNORE
        picked = F.cross_entropy(logits[:, :-1][keep].float(), target[keep], reduction="none")
        rows = torch.arange(len(labels), device=labels.device).unsqueeze(1).expand_as(target)[keep]
        sums = torch.zeros(len(labels), device=picked.device).index_add_(0, rows, picked)
        return sums, keep.sum(1)

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        sums, counts = self._token_losses(logits, batch["labels"])
        return sums.sum() / counts.sum().clamp(min=1)

    def step_loss(self, strategy: Any, model: nn.Module, loss: str | None = None, sharded: bool = False) -> StepLoss:
        """The chunked loss (``peftkit.chunked_loss``: one chunk of vocabulary-wide logits at a
        time) unless ``--loss plain`` is asked for or the model's logits cannot be chunked, said in
        one line when ``--loss chunked`` was asked for."""
        why_not = chunked_loss.unsupported(model, sharded)
        if loss == "chunked" and why_not:
            raise PeftkitError(f"--loss chunked: {why_not}; use --loss plain")
        if loss == "plain" or why_not:
            return super().step_loss(strategy, model, loss, sharded)
        layer = chunked_loss.output_layer(model)
        return StepLoss(chunked_loss.chunked_step_loss(strategy.forward, layer, IGNORE), "chunked")

    def evaluate(
        self,
        strategy: Any,
        model: nn.Module,
        loader: Any,
        accelerator: Any,
        after_batch: Callable[[], None] | None = None,
        final: bool = False,
        context: Any = None,
        data: TaskData | None = None,
    ) -> dict[str, float]:
        return self._evaluate(strategy, model, loader, accelerator, after_batch, final, context, data)[0]

    def evaluate_test(
        self,
        strategy: Any,
        model: nn.Module,
        loader: Any,
        accelerator: Any,
        after_batch: Callable[[], None] | None = None,
        context: Any = None,
        data: TaskData | None = None,
    ) -> tuple[dict[str, float], list[int] | None]:
        """The test metrics and, where answers are generated (not for plain text), whether each
        test example's answer matched its reference exactly, in the split's order."""
        return self._evaluate(strategy, model, loader, accelerator, after_batch, True, context, data)

    def _evaluate(
        self,
        strategy: Any,
        model: nn.Module,
        loader: Any,
        accelerator: Any,
        after_batch: Callable[[], None] | None,
        final: bool,
        context: Any,
        data: TaskData | None,
    ) -> tuple[dict[str, float], list[int] | None]:
        """Loss and perplexity; on ``final`` (data with answers) also the exact match, and each
        example's match in the split's order (None when nothing was generated)."""
        import torch

        shape = data.shape if data is not None else Shape.PROMPT_RESPONSE
        # plain text has no answers to generate; labelled data's answers are its labels
        generate = final and shape is not Shape.PLAIN_TEXT
        model.eval()
        loss_sum, tokens = 0.0, 0
        matches: list[torch.Tensor] = []
        keys: list[torch.Tensor] = []
        # the evaluation batch (128) x length x vocabulary logits would be 12.9 GB for 512-token
        # plain text with SmolLM2's vocabulary: the losses come in chunks wherever they can, as in training
        inner = accelerator.unwrap_model(model)
        layer = None if chunked_loss.unsupported(inner) else chunked_loss.output_layer(inner)
        with torch.no_grad():
            for batch in loader:
                if layer is None:
                    token_losses = self._token_losses(strategy.forward(model, batch), batch["labels"])
                else:
                    with chunked_loss.captured_output_input(layer) as captured:
                        strategy.forward(model, batch)
                    token_losses = chunked_loss.chunked_example_losses(captured, batch["labels"], IGNORE)
                # per example, gathered: the examples that fill up a last uneven batch drop out
                sums, counts = accelerator.gather_for_metrics(token_losses)
                loss_sum += float(sums.sum())
                tokens += int(counts.sum())
                if generate:
                    hits = exact_matches(accelerator.unwrap_model(model), batch, context)
                    matches.append(accelerator.gather_for_metrics(hits).cpu())
                    keys.append(accelerator.gather_for_metrics(batch["example_key"]).cpu())
                if after_batch is not None:
                    after_batch()
        loss = loss_sum / max(1, tokens)
        out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        if not generate:
            return out, None
        hit = torch.cat(matches) if matches else torch.zeros(0)
        out["exact_match"] = float(hit.float().mean()) if len(hit) else 0.0
        if shape is Shape.LABELLED:
            out["accuracy"] = out["exact_match"]  # the generated answer is the predicted label
        return out, in_split_order(torch.cat(keys).tolist(), hit.tolist()) if keys else None

    def metadata(self, data: TaskData, processor: Any, cfg: RunConfig) -> dict[str, Any]:
        return {
            "label_names": data.label_names,
            "max_length": cfg.max_length,
            "prompt_template": data.split_info.get("prompt_template"),
        }

    # -- planning ------------------------------------------------------------------------------
    def model_from_config(self, config: Any) -> nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)
        # under init_empty_weights (plan) the output layer is not tied to the input embeddings as
        # the config says; counted twice, a full fine-tune of SmolLM2 would plan 163M
        # parameters instead of 135M. Tie them as from_pretrained does.
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
        if tied and out is not None and inp is not None and out.weight.shape == inp.weight.shape:
            # straight into _parameters: accelerate's init_empty_weights re-creates a parameter
            # assigned the usual way (a new meta copy), which would untie it again
            out._parameters["weight"] = inp.weight
        return model

    def plan_spec(self, model: nn.Module, num_labels: int) -> TaskSpec:
        return TaskSpec(num_labels=0, label_names=(), kind=self.name, head_modules=(), peft_task_type="CAUSAL_LM")

    def loss_positions(self, data: TaskData, processor: Any, cfg: RunConfig) -> int | None:
        """Plain text learns every token: the whole length keeps vocabulary-wide logits (on the first
        GPU run, planning a short answer instead missed 4 of 13 GiB). With answers: the longest of
        the first 256 training answers, plus the end-of-sequence token."""
        length = cfg.max_length or self.default_max_length
        train = data.splits["train"]
        if data.shape is Shape.PLAIN_TEXT:
            return length
        sample = list(train.select(range(min(256, len(train))))["response"])
        longest = max((len(ids) for ids in processor(sample, add_special_tokens=False)["input_ids"]), default=0)
        return min(length, longest + 1)

    def dummy_batch(
        self,
        config: Any,
        batch_size: int,
        max_length: int | None,
        device: str,
        loss_positions: int | None = None,
        packed: bool = False,
    ) -> dict[str, Any]:
        """Prompt + an answer of ``loss_positions`` tokens per row (4 if not given), left-padded as
        ``collate`` pads; logits are kept for the answer's positions only, as in a run. ``packed``:
        full rows of examples of a quarter to an eighth of the length each, collated as
        ``--packing`` collates them (every position learned, attention inside each example)."""
        import torch

        gen = torch.Generator().manual_seed(0)
        vocab = int(getattr(config, "vocab_size", 1000))
        b, length = batch_size, max_length or self.default_max_length
        if packed:
            return self._dummy_packed(vocab, b, length, device, gen)
        mask = torch.ones(b, length, dtype=torch.long)
        mask[1::2, 0] = 0
        ids = torch.randint(5, max(6, vocab), (b, length), generator=gen)
        answer = min(loss_positions or 4, length)
        labels = torch.full((b, length), IGNORE, dtype=torch.long)
        labels[:, length - answer :] = ids[:, length - answer :]
        return {
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
            "labels": labels.to(device),
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).to(device),
            "logits_to_keep": min(length, answer + 1),
            "use_cache": False,
        }

    @staticmethod
    def _dummy_packed(vocab: int, rows: int, length: int, device: str, gen: Any) -> dict[str, Any]:
        """``rows`` full rows of ``length`` tokens, each of examples an eighth to a quarter as long."""
        import torch

        packed, key = [], 0
        for _ in range(rows):
            sizes: list[int] = []
            while sum(sizes) < length:
                sizes.append(
                    min(
                        length - sum(sizes),
                        int(torch.randint(max(1, length // 8), max(2, length // 4) + 1, (1,), generator=gen)),
                    )
                )
            ids = torch.randint(5, max(6, vocab), (length,), generator=gen).tolist()
            positions = [p for n in sizes for p in range(n)]
            starts = {sum(sizes[:i]) for i in range(len(sizes))}
            labels = [IGNORE if i in starts else t for i, t in enumerate(ids)]
            packed.append(
                {
                    "input_ids": ids,
                    "labels": labels,
                    "position_ids": positions,
                    "example_key": list(range(key, key + len(sizes))),
                }
            )
            key += len(sizes)
        batch = collate_packed(packed, 0)
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def predict(
        self, loaded: Any, texts: list[str], batch_size: int = 16, generation: GenerationOptions | None = None
    ) -> list[dict[str, Any]]:
        """Completions (greedy unless ``generation.do_sample``). An adapter trained on labelled data
        phrases each text with the prompt it learned (and says which label the answer is);
        otherwise each text is the prompt as given. With ``generation.chat`` each prompt is put in
        the model's chat template first."""
        generation = generation or GenerationOptions()
        tok = loaded.tokenizer
        template = loaded.metadata.get("prompt_template")
        names = loaded.metadata.get("label_names") or []
        prompts = [template.format(text=t) if template else t for t in texts]
        encoded = encode_prompts(tok, prompts, generation.chat, loaded.metadata.get("base_model"))
        longest = max([len(tok(" " + n, add_special_tokens=False)["input_ids"]) for n in names] or [0])
        new_tokens = generation.max_new_tokens or (longest + 1 if names else 64)
        out: list[dict[str, Any]] = []
        for i in range(0, len(prompts), batch_size):
            rows = generate(loaded.model, tok, encoded[i : i + batch_size], new_tokens, generation)
            for text, prompt, row in zip(texts[i : i + batch_size], prompts[i : i + batch_size], rows):
                completion = tok.decode(row, skip_special_tokens=True)
                item: dict[str, Any] = {"text": text, "prompt": prompt, "completion": completion}
                if names:
                    item["label"] = matching_label(completion, names)  # None: the answer is no label
                out.append(item)
        return out
