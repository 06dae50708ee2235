import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_settings_json():
    assert json.loads((ROOT / "settings.json").read_text()) == {"debug": False, "port": 8080}
