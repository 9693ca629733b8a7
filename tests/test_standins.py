"""The trainer tests' stand-ins (tests/standins.py) keep their contract: the loader resumes and shards like the
real one, items are deterministic and misaligned at the configured rate."""
import torch

from standins import make_item, standin_loader


def test_standin_loader_resumes_and_shards():
    from harmony.config import DataConfig

    cfg = DataConfig(size=40, eval_size=10, noise=0.3)
    full = standin_loader(cfg, "train", 6, 0, 1, 0, 0)
    batches = [next(full) for _ in range(4)]
    resumed = standin_loader(cfg, "train", 6, 0, 1, 0, 2)
    assert torch.equal(next(resumed)["video"], batches[2]["video"])
    halves = [next(standin_loader(cfg, "train", 3, r, 2, 0, 1)) for r in range(2)]
    assert torch.equal(torch.cat([h["index"] for h in halves]), batches[1]["index"])
    ev = list(standin_loader(cfg, "eval", 4, 0, 1, 0, 0))
    assert sum(b["index"].numel() for b in ev) == 10 and not any(b["noisy_text"].any() for b in ev)


def test_standin_items_are_deterministic_and_noisy_at_rate():
    from harmony.config import DataConfig

    cfg = DataConfig(size=400, noise=0.3)
    items = [make_item(cfg, "train", i) for i in range(400)]
    again = make_item(cfg, "train", 17)
    assert torch.equal(again["video"], items[17]["video"])
    rate = sum(it["noisy_text"] for it in items) / len(items)
    print("noisy text rate", rate)
    assert 0.2 < rate < 0.4
