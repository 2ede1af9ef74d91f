"""End-to-end tests of `cd4ml data ...`: the real CLI app (typer's CliRunner, plus one run of the installed
`cd4ml` entry point), real files, a temp CD4ML_HOME. Every bad input must exit non-zero, name the
file/line/column/value, and leave nothing behind."""
import json, os
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cd4ml.cli import app
from cd4ml.datasets import load_dataset

TRAIN_HEAD = "id,date,store_nbr,item_nbr,unit_sales,onpromotion\n"


def cd4ml(*args):
    "Run `cd4ml ARGS` in-process; returns the click Result (exit_code, stdout, stderr)."
    return CliRunner().invoke(app, [str(a) for a in args])


def cd4ml_json(*args):
    r = cd4ml(*args, "--json")
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def favorita(folder: Path, days=28, stores=(1, 2), items=(10, 11, 12), scale=1.0, train_extra="") -> Path:
    "A small Kaggle-shaped Favorita folder."
    folder.mkdir(parents=True, exist_ok=True)
    lines, i = [], 0
    for day in pd.date_range("2017-01-01", periods=days):
        for s in stores:
            for it in items:
                units = ((day.day * 7 + s * 3 + it) % 9 + 1) * scale
                lines.append(f"{i},{day.date()},{s},{it},{units},{'True' if (day.day + it) % 5 == 0 else ''}\n"); i += 1
    (folder/"train.csv").write_text(TRAIN_HEAD + "".join(lines) + train_extra)
    (folder/"items.csv").write_text("item_nbr,family,class,perishable\n" + "".join(f"{it},GROCERY I,{it},0\n" for it in items))
    (folder/"stores.csv").write_text("store_nbr,city,state,type,cluster\n" + "".join(f"{s},Quito,Pichincha,D,{s}\n" for s in stores))
    (folder/"oil.csv").write_text("date,dcoilwtico\n2017-01-02,52.36\n2017-01-03,\n")
    (folder/"holidays_events.csv").write_text("date,type,locale,locale_name,description,transferred\n"
                                              "2017-01-01,Holiday,National,Ecuador,Primer dia del ano,False\n")
    return folder


def nothing_written(home: Path):
    data = home/"data"
    assert not data.exists() or not [p for p in data.iterdir() if p.name.startswith("ds-")], list(data.iterdir())
    assert cd4ml_json("data", "list") == []


def test_favorita_import_twice_is_one_version(workspace, tmp_path):
    fav = favorita(tmp_path/"fav")
    first = cd4ml_json("data", "import", fav)
    assert (first["rows"], first["stores"], first["items"], first["freq"], first["bad_rows"]) == (168, 2, 3, "D", 0)
    assert (first["start"], first["end"], first["created"]) == ("2017-01-01", "2017-01-28", True)
    assert first["tables"] == {"holidays": 1, "items": 3, "oil": 2, "sales": 168, "stores": 2}
    again = cd4ml_json("data", "import", fav)
    assert (again["version"], again["created"]) == (first["version"], False)
    assert [m["version"] for m in cd4ml_json("data", "list")] == [first["version"]]
    shown = cd4ml_json("data", "show", first["version"][:8])
    for key in ("version", "rows", "start", "end", "stores", "items", "freq", "source", "created", "tables"):
        assert shown[key] == {**first, "created": first["created_at"]}[key], key
    ds = load_dataset(first["version"])
    assert ds.sales.unit_sales.sum() == pytest.approx(sum(((d * 7 + s * 3 + it) % 9 + 1)
                                                          for d in range(1, 29) for s in (1, 2) for it in (10, 11, 12)))
    assert ds.table("oil").dcoilwtico.isna().tolist() == [False, True]


def test_real_entry_point(workspace, cli, tmp_path):
    "The installed `cd4ml` script, as a user runs it."
    fav = favorita(tmp_path/"fav", days=7)
    env = dict(os.environ)                      # CD4ML_HOME: the workspace
    version = cli.json(env, "data", "import", fav, timeout=120)["version"]
    r = cli({**env, "COLUMNS": "200"}, "data", "list", timeout=120)
    assert r.returncode == 0 and version in r.stdout
    r = cli(env, "data", "import", tmp_path/"missing", timeout=120)
    assert r.returncode == 2 and "no such file or folder" in r.stderr and "Traceback" not in r.stderr


ORDERS = ("when,shop,sku,qty,promo\n"
          "2017-01-01 09:10,north,A-1,2,0\n2017-01-01 18:00,north,A-1,3,1\n2017-01-01,south,A-1,1,\n"
          "2017-01-02,north,A-1,4,\n2017-01-02,north,B-7,1,False\n2017-01-03,north,A-1,2,\n2017-01-03,north,A-1,-2,\n")
MAPPING = ["--date-col", "when", "--store-col", "shop", "--item-col", "sku", "--sales-col", "qty", "--promo-col", "promo"]


def test_mapped_csv_sums_duplicates_and_maps_string_keys(workspace, tmp_path):
    (tmp_path/"orders.csv").write_text(ORDERS)
    out = cd4ml_json("data", "import", tmp_path/"orders.csv", *MAPPING)
    assert (out["rows"], out["freq"], out["stores"], out["items"]) == (4, "D", 2, 2)   # 01-03 sums to 0: dropped
    ds = load_dataset(out["version"])
    keys = ds.table("keys")
    ids = {(k, key): i for k, key, i in keys[["kind", "key", "id"]].itertuples(index=False)}
    assert ids == {("store", "north"): 1, ("store", "south"): 2, ("item", "A-1"): 1, ("item", "B-7"): 2}
    got = {(str(r.date.date()), r.store_nbr, r.item_nbr): (r.unit_sales, r.onpromotion) for r in ds.sales.itertuples()}
    assert got == {("2017-01-01", 1, 1): (5.0, True), ("2017-01-01", 2, 1): (1.0, False),
                   ("2017-01-02", 1, 1): (4.0, False), ("2017-01-02", 1, 2): (1.0, False)}
    assert set(ds.table("items").family) == {"UNKNOWN"} and set(ds.table("stores").city) == {"UNKNOWN"}
    # rows in another order: same sums, same ids, same version
    lines = ORDERS.splitlines(keepends=True)
    (tmp_path/"shuffled.csv").write_text(lines[0] + "".join(reversed(lines[1:])))
    assert cd4ml_json("data", "import", tmp_path/"shuffled.csv", *MAPPING)["version"] == out["version"]
    assert len(cd4ml_json("data", "list")) == 1


def test_weekly_data_is_inferred(workspace, tmp_path):
    weeks = pd.date_range("2016-01-03", periods=20, freq="W-SUN")
    (tmp_path/"weekly.csv").write_text("week;store;product;units\n" + "".join(
        f"{w.date()};{s};{p};{(i + s + p) % 7 + 1}\n" for i, w in enumerate(weeks) for s in (5, 6) for p in (100, 200)))
    out = cd4ml_json("data", "import", tmp_path/"weekly.csv", "--date-col", "week", "--store-col", "store",
                     "--item-col", "product", "--sales-col", "units", "--delimiter", ";")
    assert (out["freq"], out["rows"], out["stores"], out["start"]) == ("W", 80, 2, "2016-01-03")
    ds = load_dataset(out["version"])
    assert sorted(ds.sales.store_nbr.unique()) == [5, 6] and "keys" not in ds       # integer keys kept as they are
    assert (ds.sales.date.dt.day_of_week == 6).all()                               # dates kept as given


BAD_TRAIN = [  # (name, extra train lines, expected message)
    ("bad number", "900,2017-01-05,1,10,abc,\n", "train.csv line 170, column 'unit_sales': 'abc' is not a number"),
    ("bad date", "900,2017-02-30,1,10,1,\n", "train.csv line 170, column 'date': '2017-02-30' is not a date"),
    ("bad flag", "900,2017-01-05,1,10,1,maybe\n", "train.csv line 170, column 'onpromotion': 'maybe' is not True/False/1/0"),
    ("bad store", "900,2017-01-05,x1,10,1,\n", "train.csv line 170, column 'store_nbr': 'x1' is not an integer"),
    ("duplicate key", "900,2017-01-05,2,11,1,\n", "train.csv line 170, column 'date,store_nbr,item_nbr': "
                                                  "'2017-01-05, 2, 11' repeats the key (date, store_nbr, item_nbr) of line 30"),
    ("unknown item", "900,2017-01-05,2,99,1,\n", "train.csv line 170, column 'item_nbr': '99' is not in items.csv"),
    ("too old", "900,1917-01-05,2,10,1,\n", "train.csv line 170, column 'date': '1917-01-05' is outside 1990-01-01"),
]


@pytest.mark.parametrize("name,extra,message", BAD_TRAIN, ids=[b[0] for b in BAD_TRAIN])
def test_bad_favorita_rows_fail_and_write_nothing(workspace, tmp_path, name, extra, message):
    fav = favorita(tmp_path/"fav", train_extra=extra)
    r = cd4ml("data", "import", fav)
    assert r.exit_code == 2 and message in r.stderr, r.stderr
    assert "--on-bad-rows skip" in r.stderr
    nothing_written(workspace)


def write(path: Path, text: str) -> Path:
    path.write_text(text); return path


def test_bad_files_fail_and_write_nothing(workspace, tmp_path):
    cases = [  # (path, mapping args, expected message)
        (write(tmp_path/"semi.csv", ORDERS.replace(",", ";")), MAPPING, "looks ';'-delimited: use --delimiter ';'"),
        (write(tmp_path/"empty.csv", ""), MAPPING, "empty.csv is empty"),
        (tmp_path/"absent.csv", MAPPING, "no such file or folder"),
        (write(tmp_path/"nosku.csv", ORDERS.replace("sku", "article")), MAPPING, "nosku.csv: missing column(s) ['sku']"),
        (write(tmp_path/"num.csv", ORDERS + "2017-01-04,north,A-1,1O,\n"), MAPPING, "num.csv line 9, column 'qty': '1O' is not a number"),
        (write(tmp_path/"date.csv", ORDERS + "04/01/2017,north,A-1,1,\n"), MAPPING, "date.csv line 9, column 'when': '04/01/2017' is not a date"),
        (write(tmp_path/"nokey.csv", ORDERS + "2017-01-04,,A-1,1,\n"), MAPPING, "nokey.csv line 9, column 'shop': value is missing"),
        (write(tmp_path/"nomap.csv", ORDERS), [], "give its column mapping, missing --date-col"),
        (write(tmp_path/"ragged.csv", ORDERS + "2017-01-04,north,A-1,1,0,extra,fields\n"), MAPPING, "ragged.csv: malformed CSV: line 9 has 7 fields, the header 5"),
    ]
    for path, args, message in cases:
        r = cd4ml("data", "import", path, *args)
        assert r.exit_code == 2 and message in r.stderr, (path.name, r.stderr)
    (tmp_path/"nostores").mkdir(); write(tmp_path/"nostores"/"train.csv", TRAIN_HEAD)
    r = cd4ml("data", "import", tmp_path/"nostores")
    assert r.exit_code == 2 and "missing file(s) ['items.csv', 'stores.csv']" in r.stderr
    header_only = favorita(tmp_path/"header-only"); write(header_only/"train.csv", TRAIN_HEAD)
    r = cd4ml("data", "import", header_only)
    assert r.exit_code == 2 and "train.csv has a header but no data rows" in r.stderr
    nothing_written(workspace)


def test_a_train_csv_too_big_for_memory_is_refused_before_reading(workspace, tmp_path):
    "Kaggle's real train.csv (125 M rows) needs ~40 GB whole: the pandas engine refuses it at once, naming the way that fits."
    big = favorita(tmp_path/"big")
    os.truncate(big/"train.csv", 64 * 2**30)    # 64 GB, sparse: the size a 1.7 G-row file would have; nothing read
    r = cd4ml("data", "import", big)
    assert r.exit_code == 2, r.stderr
    message = " ".join(r.stderr.split())        # the console wraps long lines
    assert "train.csv: about" in message and "M rows; the pandas engine holds them all" in message, message
    assert "import the folder with `cd4ml data import FOLDER --engine dask`" in message, message
    nothing_written(workspace)


def test_skip_quarantines_bad_rows(workspace, tmp_path):
    bad = "".join(BAD_TRAIN[i][1].replace("900,", f"{900 + i},") for i in range(len(BAD_TRAIN)))
    fav = favorita(tmp_path/"fav", train_extra="\n" + bad)          # a blank line: line numbers still match the file
    out = cd4ml_json("data", "import", fav, "--on-bad-rows", "skip")
    assert (out["bad_rows"], out["rows"]) == (len(BAD_TRAIN), 168)
    q = pd.read_csv(out["quarantine"])
    assert len(q) == len(BAD_TRAIN) and q.line.tolist() == list(range(171, 171 + len(BAD_TRAIN)))
    assert Path(out["quarantine"]).parent == workspace/"quarantine"
    assert "is not a number" in q.reason[0] and "repeats the key" in q.reason[4]
    assert out["version"] == cd4ml_json("data", "import", favorita(tmp_path/"clean"))["version"]   # same good rows
    assert cd4ml("data", "import", fav, "--on-bad-rows", "ignore").exit_code == 2


def test_import_dask_engine_streams_parts(workspace, tmp_path):
    "`data import FOLDER --engine dask` streams train.csv into parts of whole stores: the pandas engine's version."
    fav = favorita(tmp_path/"fav")                                      # 84 rows a store: one store a part
    parts = cd4ml_json("data", "import", fav, "--engine", "dask", "--part-rows", 84)
    assert (parts["engine"], parts["parts"], parts["created"], parts["bad_rows"], parts["rows"]) == ("dask", 2, True, 0, 168)
    ds = load_dataset(parts["version"])
    assert [p.name for p in ds.parts("sales")] == ["part-00000.parquet", "part-00001.parquet"]
    assert not (ds.path/"sales.parquet").exists()
    whole = cd4ml_json("data", "import", fav)                           # the same content: the same version
    assert (whole["version"], whole["engine"], whole["created"]) == (parts["version"], "pandas", False)


def test_import_dask_engine_errors(workspace, tmp_path):
    "A single CSV, or a train.csv out of order: exit 2, one line naming the file, nothing written."
    fav = favorita(tmp_path/"fav")
    lines = (fav/"train.csv").read_text().splitlines(keepends=True)
    write(fav/"train.csv", "".join(lines[:10] + [lines[11], lines[10]] + lines[12:]))
    for path, message in ((fav/"train.csv", "train.csv is a single CSV file: --engine dask imports a Favorita folder"),
                          (fav, "train.csv line 12: key (2017-01-02, 2, 10) comes after (2017-01-02, 2, 11) on line 11")):
        r = cd4ml("data", "import", path, "--engine", "dask")
        assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "sort the file by date, store_nbr, item_nbr, or import it with --engine pandas" in r.stderr
    nothing_written(workspace)
    assert list((workspace/"data").glob(".parts.tmp-*")) == []


def test_validate_flags_shifted_data_only(workspace, tmp_path):
    base = cd4ml_json("data", "import", favorita(tmp_path/"base"))["version"]
    same = cd4ml_json("data", "import", favorita(tmp_path/"same"))["version"]
    shifted = cd4ml_json("data", "import", favorita(tmp_path/"shifted", scale=3.0))["version"]
    assert same == base and shifted != base
    r = cd4ml("data", "validate", same, "--reference", base, "--json")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["valid"] and rep["drifted"] == []
    assert [d["column"] for d in rep["drift"]] == ["unit_sales", "onpromotion", "store_nbr", "item_nbr", "day_of_week"]
    assert rep["drift"][0]["psi"] == pytest.approx(0) and rep["drift"][0]["ks_p"] == pytest.approx(1)
    assert rep["coverage"]["current"] == {"start": "2017-01-01", "end": "2017-01-28", "dates": 28, "missing_dates": 0}
    r = cd4ml("data", "validate", shifted, "--reference", base, "--json")
    assert r.exit_code == 1
    rep = json.loads(r.stdout)
    assert rep["drifted"] == ["unit_sales"]
    unit = rep["drift"][0]
    assert unit["psi"] > 0.2 and unit["ks_p"] < 0.01 and unit["ks_stat"] > 0.3
    saved = json.loads(Path(rep["json"]).read_text())
    assert saved["drift"][0]["psi"] == pytest.approx(unit["psi"]) and Path(rep["json"]).parent == workspace/"reports"
    page = Path(rep["html"]).read_text()
    assert "unit_sales" in page and f"{unit['psi']:.4g}" in page and "<script" not in page and "src=" not in page
    r = cd4ml("data", "validate", shifted)                              # no reference: checks only
    assert r.exit_code == 0 and "all checks" in r.stdout
    r = cd4ml("data", "validate", "ds-unknown")
    assert r.exit_code == 2 and "no dataset version 'ds-unknown'" in r.stderr
    assert "Exit code" in cd4ml("data", "validate", "--help").stdout


def test_generate_from_simulator(workspace, tmp_path):
    pytest.importorskip("cd4ml.simulate", reason="cd4ml.simulate is not exported yet")
    args = ["--stores", 2, "--items", 3, "--days", 30, "--start", "2016-03-01", "--seed", 7]
    out = cd4ml_json("data", "generate", *args)
    assert out["out"] == str(workspace/"raw"/"sim-s2-i3-d30-2016-03-01-seed7") and out["created"]
    assert (out["stores"], out["start"], out["simulator"]["seed"]) == (2, "2016-03-01", 7)
    assert "truth" in load_dataset(out["version"])
    again = cd4ml_json("data", "generate", *args)
    assert (again["version"], again["created"]) == (out["version"], False)


def test_generate_partitioned_and_validate_part_by_part(workspace, tmp_path):
    "`--engine dask` streams Parquet parts (the version is the pandas engine's); `data validate` names a bad part."
    args = ["--stores", 3, "--items", 4, "--days", 60, "--part-rows", 100]     # ~120 rows a store: one store a part
    csv = cd4ml_json("data", "generate", *args[:-2], "--engine", "pandas")
    parts = cd4ml_json("data", "generate", *args, "--engine", "dask")
    assert (parts["version"], parts["engine"], parts["parts"], parts["created"]) == (csv["version"], "dask", 3, False)
    ds = load_dataset(parts["version"])
    files = sorted(p.name for p in (ds.path/"sales").iterdir())
    assert files == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    r = cd4ml("data", "validate", ds.version, "--json")
    assert r.exit_code == 0, r.stderr
    assert [c["check"] for c in json.loads(r.stdout)["checks"] if not c["passed"]] == []
    part = pd.read_parquet(ds.path/"sales"/files[1])
    part.loc[5, "unit_sales"] = float("inf")
    part.to_parquet(ds.path/"sales"/files[1], index=False)
    r = cd4ml("data", "validate", ds.version, "--json")
    assert r.exit_code == 2
    failed = {c["check"]: c["detail"] for c in json.loads(r.stdout)["checks"] if not c["passed"]}
    assert failed == {"sales: values": "sales/part-00001.parquet row 5, column 'unit_sales': 'inf' is not a finite number"}


def tree(folder: Path) -> dict:
    "Every file and folder under `folder` (hidden temp ones too): path → (size, mtime)."
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


ITEMS_HEAD = "item_nbr,family,class,perishable\n"
BAD_ITEMS = [  # (file name, content (None: no such file), expected one-line message)
    ("noclass.csv", "item_nbr,family,perishable\n13,EGGS,1\n",
     "noclass.csv: column 'class' is missing; an items file has ['item_nbr', 'family', 'class', 'perishable']"),
    ("twice.csv", ITEMS_HEAD + "13,EGGS,3,1\n14,EGGS,3,1\n13,EGGS,3,1\n",
     "twice.csv line 4: item_nbr 13 is listed twice (lines 2 and 4)"),
    ("clash.csv", ITEMS_HEAD + "13,EGGS,3,1\n11,DAIRY,11,0\n",
     "clash.csv line 3: item_nbr 11 has family 'DAIRY', but the dataset has it with family 'GROCERY I'"),
    ("flag.csv", ITEMS_HEAD + "13,EGGS,3,yes\n", "flag.csv line 2: perishable must be 0 or 1; got 'yes'"),
    ("known.csv", ITEMS_HEAD + "10,GROCERY I,10,0\n", "known.csv: every item is already in dataset"),
    ("empty.csv", "", "empty.csv: not a readable CSV"),
    ("absent.csv", None, "absent.csv: no such file"),
]


def test_bad_items_files_fail_and_write_nothing(workspace, tmp_path):
    "`cd4ml data import --items BAD.csv`: exit 2, one line naming the file, line, field and value; the datasets unchanged."
    base = cd4ml_json("data", "import", favorita(tmp_path/"fav", days=7))["version"]
    before = tree(workspace/"data")
    for name, text, message in BAD_ITEMS:
        path = tmp_path/name
        if text is not None: path.write_text(text)
        r = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["data", "import", "--items", str(path)])
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and message in lines[0], (name, r.exit_code, r.stderr)
        assert tree(workspace/"data") == before, name                   # no new version, no temp folder left
    assert [m["version"] for m in cd4ml_json("data", "list")] == [base]
    (tmp_path/"good.csv").write_text(ITEMS_HEAD + "13,EGGS,3,1\n")
    r = cd4ml("data", "import", "--items", tmp_path/"good.csv", "--dataset", "ds-nope")
    assert r.exit_code == 2 and "ds-nope" in r.stderr and tree(workspace/"data") == before, r.stderr
    added = cd4ml_json("data", "import", "--items", tmp_path/"good.csv")   # the same command on a good file: a version
    assert (added["items_of"], added["items_added"], added["created"]) == (base, 1, True)
