"""What the command lines share (sashimi/cli.py): a user error is the one line `PROG: error: ...`
on stderr and exit status 2, here for checkpoints that are damaged in each way a load can find."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from sashimi import evaluate, render


def config_is_a_list(folder):
    (folder / "config.json").write_text("[]")


def weights_hold_nan(folder):
    weights = load_file(folder / "model.safetensors")
    weights["embedding.weight"][0] = float("nan")
    save_file(weights, folder / "model.safetensors")


def weights_of_another_width(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "d_model": 2 * config["d_model"]}))


COMMANDS = {  # prog -> (main, the arguments besides --checkpoint)
    "python -m sashimi.render": (render.main, ["--out", "{tmp}/out", "--seconds", "0.01"]),
    "python -m sashimi.evaluate": (evaluate.main, ["--data", "{data}", "--seq-len", "512"]),
}


@pytest.mark.parametrize("damage", [config_is_a_list, weights_hold_nan, weights_of_another_width])
@pytest.mark.parametrize("prog", COMMANDS)
def test_a_damaged_checkpoint_is_one_line_and_exit_2(
    prog, damage, tiny_checkpoint, audio_folder, tmp_path, capsys
):
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "damaged")
    damage(folder)
    main, args = COMMANDS[prog]
    args = [a.format(tmp=tmp_path, data=audio_folder) for a in args]
    with pytest.raises(SystemExit) as exit:
        main(["--checkpoint", str(folder), *args, "--device", "cpu"])
    assert exit.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: {folder}/"), captured.err
    assert captured.out == ""
