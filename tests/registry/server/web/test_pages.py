"""Every page for an empty and a full registry: what it shows, escaping of user text,
pagination and sorting with cursors, and the chart."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlparse

import pytest

from tests.registry.conftest import BACKENDS

from .catalog import HOSTILE, LLAMA, QWEN, delta, fill_catalog, push
from .conftest import BROWSER, text_of


def page(client, path: str, status: int = 200) -> str:
    r = client.get(path, headers=BROWSER)
    assert r.status_code == status, (path, r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("text/html")
    return r.text


# --- empty registry --------------------------------------------------------------------------
def test_empty_registry_says_how_to_add_a_base(client):
    html = page(client, "/")
    assert "No base models yet" in html
    assert "deltactl base add org/base ./base-checkpoint" in html
    assert "No repositories yet" in page(client, "/search")
    login = page(client, "/login")
    assert "This registry runs without authentication" in login and 'name="token"' not in login


def test_base_and_repository_without_content_have_empty_states(client):
    client.post("/v1/bases", json={"name": LLAMA[0], "fingerprint": LLAMA[1]})
    assert "No delta repositories for this base yet" in page(client, "/bases/org/llama-tiny")
    client.post("/v1/repos", json={"namespace": "acme", "name": "new", "base": LLAMA[0]})
    html = page(client, "/acme/new")
    assert "Nothing pushed yet" in html and "deltactl push math.bdelta acme/new" in html
    assert "<svg" not in html  # no chart without versions


# --- full registry ---------------------------------------------------------------------------
@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_index_lists_bases_with_their_repository_counts(catalog_client):
    text = text_of(page(catalog_client, "/"))
    assert "org/llama-tiny LlamaForCausalLM 1.1B 1a1a1a1a1a1a 4" in text  # acme/math, code, empty, lab/secret
    assert "qwen/Qwen2-mini Qwen2ForCausalLM 494.0M 2b2b2b2b2b2b 1" in text


def test_base_page_shows_each_repository_latest_version_tags_size_ratio_and_fidelity(catalog_client):
    html = page(catalog_client, "/bases/org/llama-tiny")
    math = catalog_client.get("/v1/repos/acme/math").json()
    row = re.search(r'<a class="strong" href="/acme/math">.*?</tr>', html, re.S).group(0)
    text = text_of(row)
    assert "v4" in text and "latest" in text and "prod" in text
    assert f"{math['latest']['size_ratio']:.1f}×" in text
    assert "gain kept 89.0% · KL 0.0125 · top-1 94.5%" in text  # fidelity(3) of v4
    assert "qwen-fans/chat" not in html  # another base's repository


def test_repository_page_shows_versions_commands_and_chart(catalog_client):
    html = page(catalog_client, "/acme/math")
    versions = catalog_client.get("/v1/repos/acme/math/versions").json()["items"]
    text = text_of(html)
    assert "Grade-school math fine-tune, distilled scales." in text
    for v in versions:
        row = text_of(
            re.search(rf'href="/acme/math@{v["number"]}">v{v["number"]}</a>.*?</tr>', html, re.S).group(0)
        )
        assert v["digest"][7:19] in row
        assert f"{v['size_ratio']:.1f}×" in row
        assert f"{v['fidelity']['gain_recovered'] * 100:.1f}%" in row
        assert f"{v['fidelity']['top1_agreement'] * 100:.1f}%" in row
        planes = "2 planes" if v["number"] >= 3 else "1 plane"
        assert f"bitdelta · {planes} · per-matrix" in row
    assert "prod" in text_of(re.search(r'href="/acme/math@3">v3</a>.*?</tr>', html, re.S).group(0))
    assert "deltactl pull acme/math --registry http://testserver" in html
    assert (
        "registry = RegistryApi(&#34;http://testserver&#34;)" in html
        or 'RegistryApi("http://testserver")' in html
    )
    assert "resolver=lambda ref: registry.pull(ref).path" in html
    svg = re.search(r"<svg class=\"chart\".*?</svg>", html, re.S).group(0)
    lines = re.findall(r'<polyline class="line (ratio|fid)" points="([^"]+)"', svg)
    assert [kind for kind, _ in lines] == ["ratio", "fid"]
    assert all(len(points.split()) == 4 for _, points in lines)  # one point per version
    assert "gain kept (right axis)" in html


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_version_page_shows_metadata_calibration_tensors_and_download(catalog_client):
    html = page(catalog_client, "/acme/math@3")
    text = text_of(html)
    assert "calibration" in text and "gsm8k-train" in text and "steps 300" in text
    assert "created_with deltastore 0.1.0" in text
    assert "binarized (sign + scale) 1 520 B" in text  # 2 planes × 32 rows × 8 bytes + 2 scales
    assert "kept dense (.full) 1 128 B" in text
    assert "unchanged" in text
    assert 'href="/-/download/acme/math/3"' in html
    # a tag names the same version
    assert text_of(page(catalog_client, "/acme/math@prod")) == text


def test_version_download_link_serves_the_stored_bytes(catalog_client):
    api = catalog_client.get("/v1/repos/acme/math/versions/2/download")
    r = catalog_client.get("/-/download/acme/math/2", headers=BROWSER)
    assert r.status_code == 200 and r.content == api.content
    assert r.headers["x-deltastore-digest"] == api.headers["x-deltastore-digest"]


def test_search_finds_repositories_by_namespace_or_name(catalog_client):
    text = text_of(page(catalog_client, "/search?q=acme"))
    assert all(name in text for name in ("acme/math", "acme/code", "acme/empty"))
    assert "qwen-fans/chat" not in text
    assert "No repositories match “zzz”" in text_of(page(catalog_client, "/search?q=zzz"))


@pytest.mark.parametrize("path", ["/bases/org/llama-tiny", "/acme/code", "/acme/code@1", "/search?q=code"])
def test_user_text_is_escaped(catalog_client, path):
    html = page(catalog_client, path)
    assert "<script>" not in html and "<b>bold</b>" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in html


def test_markup_in_version_description_and_fidelity_renders_as_text(catalog_client):
    html = page(catalog_client, "/acme/code@1")  # the version's description and a fidelity note hold it
    assert html.count("&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;") == 2
    assert HOSTILE in text_of(html).replace("&lt;", "<").replace("&gt;", ">").replace("&#34;", '"').replace(
        "&amp;", "&"
    )


# --- pagination and sorting ------------------------------------------------------------------
def _walk(client, path: str) -> list[list[str]]:
    """Follow 'next page' links from `path`; the repository names of each page."""
    pages, seen = [], 0
    while path and seen < 20:
        html = page(client, path)
        pages.append(re.findall(r'<a class="strong" href="/([a-z0-9._-]+/[a-z0-9._-]+)">', html))
        link = re.search(r'<a rel="next" href="([^"]+)"', html)
        base = urlparse(path).path
        path = base + link.group(1).replace("&amp;", "&") if link else None
        seen += 1
    return pages


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
@pytest.mark.parametrize("sort", ["name", "updated", "size", "ratio", "created"])
def test_base_page_pages_through_every_repository_once_in_sort_order(make_client, sort):
    client = make_client(page_size=2)
    fill_catalog(client)
    pages = _walk(client, f"/bases/org/llama-tiny?sort={sort}")
    names = [n for p in pages for n in p]
    assert [len(p) for p in pages] == [2, 2]
    assert sorted(names) == ["acme/code", "acme/empty", "acme/math", "lab/secret"]
    repos = {
        r["full_name"]: r for r in client.get("/v1/bases/org/llama-tiny/repos?limit=100").json()["items"]
    }
    if sort == "name":
        assert names == sorted(names)
    elif sort == "size":
        sizes = [repos[n]["latest"]["size"] if repos[n]["latest"] else -1 for n in names]
        assert sizes == sorted(sizes, reverse=True)
    elif sort == "ratio":
        ratios = [repos[n]["latest"]["size_ratio"] if repos[n]["latest"] else -1 for n in names]
        assert ratios == sorted(ratios, reverse=True)
    elif sort == "created":
        assert names == ["acme/math", "acme/code", "lab/secret", "acme/empty"]  # creation order


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_repository_page_pages_through_versions_with_the_api_cursor(make_client):
    client = make_client(page_size=3)
    fill_catalog(client)
    html = page(client, "/acme/math")
    assert re.findall(r'href="/acme/math@(\d+)">v', html) == ["4", "3", "2"]
    cursor = parse_qs(urlparse(re.search(r'rel="next" href="([^"]+)"', html).group(1)).query)["cursor"][0]
    assert cursor == client.get("/v1/repos/acme/math/versions?limit=3").json()["next_cursor"]
    rest = page(client, f"/acme/math?cursor={cursor}")
    assert re.findall(r'href="/acme/math@(\d+)">v', rest) == ["1"]
    assert 'rel="next"' not in rest and "first page" in rest
    assert (
        len(re.search(r'class="line ratio" points="([^"]+)"', rest).group(1).split()) == 4
    )  # the chart: all


@pytest.mark.parametrize("query", ["sort=popularity", "cursor=bm90LWpzb24", "sort=size&cursor=WyJ4IiwgMV0"])
def test_bad_sort_or_cursor_is_a_400_page(catalog_client, query):
    html = page(catalog_client, f"/bases/org/llama-tiny?{query}", status=400)
    assert "Bad request" in html and ("unknown sort" in html or "invalid cursor" in html)


def test_version_page_shows_the_fine_tunes_config(catalog_client):
    text = text_of(page(catalog_client, "/qwen-fans/chat@1"))
    assert "Fine-tune's config.json (4 keys)" in text
    assert "hidden_size 896" in text and 'architectures ["Qwen2ForCausalLM"]' in text.replace("&#34;", '"')
    assert "x-hf-config" not in text  # shown as the table above, not as a JSON string


def test_qwen_base_page_and_unknown_base(catalog_client):
    assert "qwen-fans/chat" in page(catalog_client, f"/bases/{QWEN[0]}")
    assert "base model &#39;org/none&#39; is not registered" in page(
        catalog_client, "/bases/org/none", status=404
    )


def test_version_page_survives_a_blob_store_that_lost_the_bytes(catalog_client, data_dir):
    push(catalog_client, "acme/empty", delta(LLAMA, 99))  # bytes no earlier page has summarized
    for blob in (data_dir / "blobs").rglob("*"):
        if blob.is_file():
            blob.unlink()
    html = page(catalog_client, "/acme/empty@1")
    assert "The per-tensor summary is unavailable" in html
    assert "bitdelta · 1 plane · per-matrix" in html  # the index's record is still shown
