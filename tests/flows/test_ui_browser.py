"""The artifacts as a user sees them: the pipeline's markdown and table artifacts, made inside a real
flow run on a local server, opened in headless Chromium; the rendered DOM must show every heading,
every picture and every table row. Skipped, with the reason, where Chromium is not installed
(``make test`` installs Debian's ``chromium`` when it can)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no chromium on PATH (apt-get install chromium): "
        "the browser test of the UI's artifact pages did not run",
    ),
]

FLOW = r"""
import sys
from pathlib import Path
import numpy as np
from PIL import Image
from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from flows.artifacts import markdown_with_images

out = Path(sys.argv[1])
rng = np.random.default_rng(0)
pics = []
for k in range(4):
    p = out / f"fig{k}.png"
    Image.fromarray(rng.integers(0, 255, (700, 900, 3), dtype="uint8")).save(p)
    pics.append(p)

@flow(name="artifact-check")
def artifact_check():
    blocks = [("Precision and recall", [("PR curve", pics[0])]), ("Fused scores", [("scores", pics[1])]),
              ("Samples", [("sample 1", pics[2]), ("sample 2", pics[3])])]
    create_markdown_artifact(markdown_with_images("Pseudo labels", blocks, "12 pseudo labels from 2 models."),
                             key="browser-md")
    create_table_artifact([{"model": "teacher:teacher_a", "hmean": 0.61},
                           {"model": "control:student", "hmean": 0.66}],
                          key="browser-table")

artifact_check()
"""


def _dom(url: str) -> str:
    res = subprocess.run(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--dump-dom",
            "--virtual-time-budget=25000",
            "--window-size=1400,1600",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    return res.stdout


def test_artifact_pages_render_headings_pictures_and_rows(server, tmp_path):
    res = subprocess.run(
        [sys.executable, "-c", FLOW, str(tmp_path)],
        env=server.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # an explicit settings context: an earlier test of this process may have bound Prefect to its own server
    with (
        temporary_settings({PREFECT_API_URL: server.env["PREFECT_API_URL"]}),
        get_client(sync_client=True) as client,
    ):
        arts = {
            a.key: a
            for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["browser-md", "browser-table"]))
            )
        }
    assert set(arts) == {"browser-md", "browser-table"}

    for ui in ("", "/v2"):  # the default UI and the V2 UI the server also ships
        md = _dom(f"{server.url}{ui}/artifacts/artifact/{arts['browser-md'].id}")
        headings = re.findall(r"<h([12])[^>]*>(.*?)</h\1>", md, flags=re.S)
        texts = [re.sub(r"<[^>]+>", "", t).strip() for _, t in headings]
        for h in ("Pseudo labels", "Precision and recall", "Fused scores", "Samples"):
            assert h in texts, (ui, h, texts)
        assert len(re.findall(r'<img[^>]+src="data:image/jpeg;base64,', md)) == 4, ui
        assert "12 pseudo labels from 2 models." in md

    table = _dom(f"{server.url}/artifacts/artifact/{arts['browser-table'].id}")
    for cell in ("teacher:teacher_a", "control:student", "0.61", "0.66"):
        assert cell in table, cell
