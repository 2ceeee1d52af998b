"""Search spaces: every shipped file loads; malformed ones are rejected with the key named."""


import pytest

from tuner.errors import UserError
from tuner.model.sizes import SIZES
from tuner.tune.search_space import SEARCH_SPACES_DIR, read_space, to_tune
from tuner.tune.experiment import trial_config


# search spaces that are not a model size: the dataset's or the fine-tuning method's own
# file -> the size its samples are checked with
EXTRA_SPACES = {"ml1m": "bert4rec", "ml1m_lr": "bert4rec", "ml1m_schedule": "bert4rec", "ml1m_last": "bert4rec",
                "ml1m_window": "bert4rec", "ilora": "tiny"}
DROPOUT_KEY = {"ilora": "ilora.dropout"}


def test_every_size_has_a_search_space_and_every_file_loads():
    files = sorted(SEARCH_SPACES_DIR.glob("*.yaml"))
    assert {f.stem for f in files} == set(SIZES) | set(EXTRA_SPACES)
    for file in files:
        space = read_space(file)
        assert {"optim.lr", DROPOUT_KEY.get(file.stem, "model.dropout"), "optim.weight_decay"} <= set(space), file.name
        assert "loguniform" in space["optim.lr"] and "loguniform" in space["optim.weight_decay"]
        tune_space = to_tune(space)
        # samples from every distribution make a valid config
        for _ in range(20):
            params = {k: dist.sample() for k, dist in tune_space.items()}
            from tuner.config import load_config

            size = EXTRA_SPACES.get(file.stem, file.stem)
            base = load_config(overrides=[f"model.size={size}", f"ilora.enabled={file.stem == 'ilora'}"]).to_dict()
            cfg = trial_config(base, params)
            assert cfg.optim.lr == pytest.approx(params["optim.lr"])


@pytest.mark.parametrize("text, message", [
    ("optim.learning_rate: {loguniform: [1.0e-4, 1.0e-2]}\n", "unknown config key 'optim.learning_rate'"),
    ("optim.lr: {lognormal: [1, 2]}\n", "unknown distribution 'lognormal'"),
    ("optim.lr: {loguniform: [0, 1.0e-2]}\n", "needs low > 0"),
    ("optim.lr: {loguniform: [1.0e-2, 1.0e-4]}\n", "needs low < high"),
    ("optim.lr: {uniform: [1]}\n", "needs 2 numbers"),
    ("optim.lr: 0.001\n", "must be one distribution"),
    ("model.dropout: {uniform: [0.0, 1.5]}\n", "allows an invalid value"),
    ("model.size: {choice: [tiny, huge]}\n", "allows an invalid value"),
    ("[unclosed\n", "not valid YAML"),
    ("", "non-empty mapping"),
])
def test_malformed_search_spaces_name_the_problem(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        read_space(path)
    assert message in str(info.value) and str(path) in str(info.value)
