"""Does the encoder help the task? The downstream probe that `mlmtune probe`, `train --downstream` and
`eval --downstream` run: a classifier learned on a labelled task (`task.py`) from the model's encoder, scored on
held-out texts by accuracy and macro-F1, over several seeds.

- linear: the encoder frozen; each text's features are the mean of its last layer over the real tokens and its
  first token's vector, side by side (2H); for a sentence encoder (`sentence.py`), its own sentence embedding
  instead (its pooling and normalisation, as `SentenceTransformer.encode` computes it: H). A multinomial logistic
  regression (binomial for two classes) with scikit-learn's default L2 penalty (C = 1) on standardised features,
  fitted by full-batch L-BFGS in float64. A few lines of torch rather than scikit-learn: no new dependency, and
  the fit runs where the features are (a GPU). It minimises scikit-learn's `LogisticRegression` objective, so the
  two agree (the tests check it).
- finetune: `AutoModelForSequenceClassification` with the encoder's weights (what `from_pretrained` of the
  model folder gives), trained whole: AdamW, 10% warm-up then linear decay, gradients clipped at 1.

Seeds change the split (when the task has none of its own), and with finetune the new classifier, the order of
the texts and the dropout; the linear probe on a task's own split is deterministic, so it runs once.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mlmtune.device import PRECISION_NAMES, resolve_precision
from mlmtune.errors import MlmtuneError
from mlmtune.evaluation.task import TaskData
from mlmtune.model.forward import pad_rows
from mlmtune.model.load import max_positions
from mlmtune.model.sentence import SentenceEncoder
from mlmtune.probe_config import TaskConfig

C = 1.0  # the inverse L2 strength, scikit-learn's default


def _token_rows(tokenizer, texts: list[str], limit: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=limit)["input_ids"]


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def mean_and_first(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) last layer, (B, T) attention mask -> (B, 2H): the mean over the real tokens, then the first
    token's vector."""
    mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, H)
    return torch.cat([mean, hidden[:, 0]], dim=1)


@torch.no_grad()
def features(model, tokenizer, texts: list[str], device: torch.device, batch_size: int = 32,
             max_length: int = 128, progress: bool = False, dtype: torch.dtype | None = None,
             pool: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = mean_and_first) -> torch.Tensor:
    """The frozen encoder's features of each text, `pool` of its last layer: by default the mean over the real
    tokens, then the first token's vector, (N, 2H) float32 on `device`. Texts are batched by length, so little is
    padding.

    Args:
        model: a masked-LM (its encoder is `model.base_model`) or an encoder.
        dtype: the autocast dtype of the encoder's matmuls (None: fp32).
        pool: (B, T, H) float32 last layer and (B, T) attention mask -> (B, D), e.g. `SentenceEncoder.pool`.
    """
    encoder = model.base_model
    was_training = encoder.training
    encoder.eval()
    rows = _token_rows(tokenizer, texts, min(max_length, max_positions(model, tokenizer)))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list[torch.Tensor | None] = [None] * len(rows)
    for start in tqdm(range(0, len(order), batch_size), desc="Probe features", disable=not progress, leave=False):
        chunk = order[start : start + batch_size]
        ids, attention = pad_rows([rows[i] for i in chunk], _pad_id(tokenizer))
        mask = attention.to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            hidden = encoder(input_ids=ids.to(device), attention_mask=mask).last_hidden_state.float()  # (B, T, H)
        for i, row in zip(chunk, pool(hidden, mask)):
            out[i] = row
    encoder.train(was_training)
    return torch.stack(out)  # type: ignore[arg-type]


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, max_iter: int = 500):
    """L2-penalised logistic regression on standardised features, scikit-learn's objective at C = 1:
    mean cross-entropy + ||W||^2 / (2 C N), the bias unpenalised; binomial (one weight vector) for two classes.

    Args:
        x: (N, D) features; y: (N,) class indices.

    Returns:
        A function from (M, D) features to (M,) predicted classes.
    """
    x = x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant feature, as StandardScaler leaves it
    z = (x - mean) / std
    y = y.to(x.device)
    outputs = 1 if n_classes == 2 else n_classes
    weight = torch.zeros(z.shape[1], outputs, dtype=torch.float64, device=x.device, requires_grad=True)
    bias = torch.zeros(outputs, dtype=torch.float64, device=x.device, requires_grad=True)
    penalty = 1.0 / (C * len(z))
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, tolerance_grad=1e-7,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        logits = z @ weight + bias
        if n_classes == 2:
            loss = F.binary_cross_entropy_with_logits(logits[:, 0], y.double())
        else:
            loss = F.cross_entropy(logits, y)
        loss = loss + penalty / 2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    weight, bias = weight.detach(), bias.detach()

    def predict(features: torch.Tensor) -> torch.Tensor:
        logits = ((features.double().to(x.device) - mean) / std) @ weight + bias
        return (logits[:, 0] > 0).long() if n_classes == 2 else logits.argmax(1)

    return predict


def scores(truth: torch.Tensor, predicted: torch.Tensor) -> dict[str, float]:
    """Accuracy, and macro-F1 over the classes that occur in the truth or the predictions."""
    truth, predicted = truth.cpu(), predicted.cpu()
    f1s = []
    for c in torch.cat([truth, predicted]).unique().tolist():
        tp = int(((predicted == c) & (truth == c)).sum())
        fp = int(((predicted == c) & (truth != c)).sum())
        fn = int(((predicted != c) & (truth == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float((truth == predicted).double().mean()), "f1": sum(f1s) / len(f1s)}


def _classifier(model, n_classes: int):
    """`AutoModelForSequenceClassification` for the model's architecture, holding a copy of its encoder."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(model.config)
    config.num_labels = n_classes
    config.problem_type = "single_label_classification"
    try:
        classifier = AutoModelForSequenceClassification.from_config(config)
    except ValueError:
        raise MlmtuneError(f"--method finetune: transformers has no sequence-classification model for "
                           f"{config.model_type}; use --method linear") from None
    missing = classifier.base_model.load_state_dict(model.base_model.state_dict(), strict=False)
    if missing.unexpected_keys:
        raise MlmtuneError(f"--method finetune: the encoder's weights do not fit {type(classifier).__name__} "
                           f"({', '.join(missing.unexpected_keys[:3])}); use --method linear")
    return classifier


def _decay_groups(model) -> list[dict]:
    """AdamW's groups as the Trainer makes them: no weight decay on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]


def finetune_predict(model, tokenizer, texts: list[str], labels: torch.Tensor, train: torch.Tensor,
                     test: torch.Tensor, n_classes: int, cfg: TaskConfig, seed: int, device: torch.device,
                     dtype: torch.dtype | None, progress: bool = False) -> torch.Tensor:
    """Fine-tune a sequence classifier made from the model's encoder on `train` (indices into `texts`), with the
    seed's classifier, order and dropout; its predictions on `test`."""
    torch.manual_seed(seed)
    classifier = _classifier(model, n_classes).to(device)
    rows = _token_rows(tokenizer, texts, min(cfg.max_length, max_positions(model, tokenizer)))
    per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = max(1, math.ceil(cfg.epochs * per_epoch))
    warmup = int(0.1 * total)
    optimizer = torch.optim.AdamW(_decay_groups(classifier), lr=cfg.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    g = torch.Generator().manual_seed(seed)
    classifier.train()
    for step in tqdm(range(total), desc="Probe fine-tune", disable=not progress, leave=False):
        k = step % per_epoch
        if k == 0:  # each epoch in its own order
            order = train[torch.randperm(len(train), generator=g)]
        batch = order[k * cfg.batch_size : (k + 1) * cfg.batch_size]
        ids, attention = pad_rows([rows[i] for i in batch.tolist()], _pad_id(tokenizer))
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = classifier(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
        loss = F.cross_entropy(logits.float(), labels[batch].to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(classifier.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    classifier.eval()
    predicted = []
    with torch.no_grad():
        for start in range(0, len(test), cfg.batch_size):
            batch = test[start : start + cfg.batch_size]
            ids, attention = pad_rows([rows[i] for i in batch.tolist()], _pad_id(tokenizer))
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                predicted.append(classifier(input_ids=ids.to(device), attention_mask=attention.to(device))
                                 .logits.argmax(-1).cpu())
    return torch.cat(predicted)


def seeds_of(cfg: TaskConfig, seed: int, data: TaskData) -> list[int]:
    """The seeds a probe runs: one for the deterministic linear probe on a task's own split, else --seeds."""
    return [seed] if cfg.method == "linear" and data.own_split else [seed + i for i in range(cfg.seeds)]


def probe(model, tokenizer, data: TaskData, cfg: TaskConfig, seed: int, device: torch.device,
          precision: str = "fp32", progress: bool = False, encoder: SentenceEncoder | None = None) -> dict:
    """The probe's scores for one model, each seed's and their mean and standard deviation.

    Args:
        model: a masked-LM (or any model whose `base_model` is the encoder), left as it was.
        data: the task, read once (`TaskData`), so that models compared see the same examples.
        precision: the encoder's arithmetic: fp32 (as every evaluation of a run), or bf16, fp16, auto as
            `train --precision` takes them.
        encoder: the model's sentence-transformers modules, when it is a sentence encoder whose pooling
            `sentence.py` computes: the linear probe reads its sentence embedding instead of mean and first token.

    Returns:
        A dict: method, seeds, runs (each seed's accuracy and f1), accuracy and f1 (means), accuracy_std and
        f1_std (sample standard deviations; 0 for one run), classes, train_examples, test_examples.
    """
    seeds = seeds_of(cfg, seed, data)
    dtype = resolve_precision(precision, device)
    splits = [data.split(s) for s in seeds]
    where = next(model.parameters()).device
    model.to(device)
    try:
        if cfg.method == "linear":  # the features once, for every seed's split
            if encoder is not None and encoder.problem is None:  # the model's own sentence embedding
                feats = features(model, tokenizer, encoder.prepare(data.texts), device, cfg.batch_size,
                                 min(cfg.max_length, encoder.max_seq_length or cfg.max_length), progress, dtype,
                                 encoder.pool)
            else:
                feats = features(model, tokenizer, data.texts, device, cfg.batch_size, cfg.max_length, progress,
                                 dtype)
        runs = []
        for s, (train, test) in zip(seeds, splits):
            if cfg.method == "linear":
                predict = fit_logistic(feats[train.to(feats.device)], data.labels[train], len(data.classes))
                predicted = predict(feats[test.to(feats.device)])
            else:
                predicted = finetune_predict(model, tokenizer, data.texts, data.labels, train, test,
                                             len(data.classes), cfg, s, device, dtype, progress)
            runs.append({"seed": s, **scores(data.labels[test], predicted)})
    finally:
        model.to(where)
    return {"method": cfg.method, "seeds": seeds, "runs": runs, **_spread(runs, "accuracy"), **_spread(runs, "f1"),
            "precision": PRECISION_NAMES[dtype], "classes": len(data.classes), "train_examples": len(splits[0][0]),
            "test_examples": len(splits[0][1])}


def _spread(runs: list[dict], key: str) -> dict[str, float]:
    values = [r[key] for r in runs]
    return {key: statistics.fmean(values), f"{key}_std": statistics.stdev(values) if len(values) > 1 else 0.0}
