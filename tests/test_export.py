"""The exported inference graph gives the eager model's top-K."""

import torch

from tuner.export import CatalogScorer, export_scorer, load, save
from tuner.model.bert4rec import Bert4Rec, Bert4RecConfig


def test_exported_program_matches_eager_top_k(tmp_path):
    torch.manual_seed(0)
    model = Bert4Rec(Bert4RecConfig(num_items=200, hidden=32, layers=2, heads=2, ffn=64, max_len=12)).eval()
    program = export_scorer(model)
    restored = load(save(program, tmp_path / "scorer.pt2")).module()
    ids = torch.randint(1, 201, (5, 12))
    ids[:2, :6] = 0  # left padding
    ids[:, -1] = model.cfg.mask_token
    with torch.no_grad():
        eager = CatalogScorer(model)(ids)
        exported = restored(ids)
    torch.testing.assert_close(exported, eager, rtol=1e-4, atol=1e-5)
    assert torch.equal(exported.topk(10).indices, eager.topk(10).indices)
    with torch.no_grad():  # the batch dimension is dynamic
        assert restored(ids[:1]).shape == (1, 200)
