"""Synthetic contract-clause extraction data for the tunesmith demo: clause text in, compact JSON out.

Each record is an OpenAI-messages conversation:
    system:    SYSTEM (one sentence naming the keys)
    user:      one contract clause (~40-90 tokens with the SmolLM2 tokenizer)
    assistant: {"clause_type": ..., "parties": [...], "amounts": [...], "dates": [...], "durations": [...],
                "governing_law": ... | null}   (fixed key order, ~30-60 tokens)

Every extracted value is copied verbatim from the clause (lists in order of first appearance, no repeats), so a
grounding metric can check `value in clause` for each of them; `clause_type` is a label, not a span.

Splits: train / validation / test share one distribution (templates in TEMPLATES, TRAIN_JURISDICTIONS);
ood uses one held-out template per clause type (OOD_TEMPLATES, different sentence structure) and held-out
jurisdictions (OOD_JURISDICTIONS), so it measures generalisation rather than template recall. Clause types are
balanced within each split (counts differ by at most one). No clause text occurs twice in or across splits.

Usage:  python examples/contracts/generate.py --out data/contracts --seed 0 [--stats]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import string
import tempfile
from pathlib import Path
from typing import Any

SYSTEM = ("Extract the clause as JSON with keys clause_type, parties, amounts, dates, durations, "
          "governing_law.")

CLAUSE_TYPES = ("indemnification_carve_out", "limitation_of_liability", "material_adverse_change",
                "termination", "confidentiality", "governing_law")
KEYS = ("clause_type", "parties", "amounts", "dates", "durations", "governing_law")
SPLITS = ("train", "validation", "test", "ood")

# Slot names in templates: p1/p2 parties, amt1/amt2 amounts, date1/date2 dates, dur1/dur2 durations, law.
# A slot may appear more than once in a template; the extracted lists hold each value once.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "indemnification_carve_out": (
        "{p1} shall indemnify {p2} against all third-party claims, except that {p1} shall have no obligation "
        "to indemnify for Losses arising from the gross negligence or wilful misconduct of {p2} or for claims "
        "exceeding {amt1} in the aggregate.",
        "Notwithstanding Section 9.1, the indemnification obligations of {p1} shall not apply to any claim "
        "notified after {date1} or to any claim arising from modifications made by {p2} without consent.",
        "The obligations of {p1} under this Article shall not extend to Losses below {amt1} per claim, nor to "
        "any Losses incurred by the Buyer more than {dur1} after the Closing Date.",
        "{p1} shall not be required to indemnify {p2} for fines or penalties, provided that this exclusion "
        "shall cease to apply if {p1} fails to cure the relevant breach within {dur1} of written notice.",
    ),
    "limitation_of_liability": (
        "In no event shall the aggregate liability of {p1} to {p2} under this Agreement exceed {amt1}, "
        "except in the case of fraud or wilful misconduct.",
        "Neither {p1} nor {p2} shall be liable for any indirect, incidental or consequential damages, and "
        "each party's total liability shall not exceed the fees paid in the {dur1} preceding the claim.",
        "The total liability of {p1} arising out of or relating to this Agreement shall not exceed the "
        "greater of {amt1} and the amounts paid by the Customer during the {dur1} before the event giving rise to "
        "liability.",
        "{p2} agrees that any claim against {p1} must be brought within {dur1} of the date on which it arose "
        "and that the liability of {p1} for such claim shall be limited to {amt1}.",
    ),
    "material_adverse_change": (
        "If, before {date1}, a Material Adverse Change occurs with respect to {p1}, {p2} may terminate this "
        "Agreement by written notice without liability or penalty.",
        "{p1} represents to the Lender that since {date1} there has been no Material Adverse Change in its "
        "business, assets or financial condition, including any single loss exceeding {amt1}.",
        "Material Adverse Change means any event that reduces the consolidated EBITDA of {p1} by more than "
        "{amt1} over any period of {dur1}, as determined by {p2} acting reasonably.",
        "The obligation of {p2} to fund the Loan is conditional upon no Material Adverse Change having "
        "occurred in relation to {p1} between {date1} and the Closing Date.",
    ),
    "termination": (
        "Either {p1} or {p2} may terminate this Agreement for convenience upon {dur1} prior written notice "
        "to the other party.",
        "{p1} may terminate this Agreement with immediate effect if the Customer fails to pay any undisputed amount "
        "exceeding {amt1} within {dur1} after its due date.",
        "This Agreement shall commence on {date1} and shall continue for an initial term of {dur1}, unless "
        "earlier terminated by {p1} or {p2} in accordance with this Section.",
        "Upon termination by {p2} for convenience, {p2} shall pay to {p1} a termination fee of {amt1} within "
        "{dur1} of the effective date of termination.",
    ),
    "confidentiality": (
        "{p1} shall hold in confidence all Confidential Information disclosed by {p2} and shall not disclose "
        "it to any third party for a period of {dur1} following the Effective Date.",
        "{p2} may disclose Confidential Information of {p1} only to those of its employees who need to know "
        "it, and shall return or destroy all such information no later than {date1}.",
        "Any unauthorised disclosure by {p2} of Confidential Information received from {p1} shall entitle "
        "{p1} to liquidated damages of {amt1}, without prejudice to injunctive relief.",
        "The confidentiality obligations of {p1} and {p2} under this Section shall survive for {dur1} after "
        "the expiry or termination of this Agreement on any ground.",
    ),
    "governing_law": (
        "This Agreement and any dispute arising out of it shall be governed by and construed in accordance "
        "with the laws of {law}, without regard to its conflict of laws principles.",
        "{p1} and {p2} agree that this Agreement shall be governed by the laws of {law} and irrevocably "
        "submit to the exclusive jurisdiction of the courts of {law}.",
        "The validity, interpretation and performance of this Agreement between {p1} and {p2} shall be "
        "governed exclusively by the laws of {law}.",
        "This Agreement, entered into on {date1}, is governed by the laws of {law}, and any claim by {p1} "
        "against {p2} shall be brought only in the courts of {law}.",
    ),
}

# Held out of train/validation/test: a different sentence shape per type (headings, lists, inverted order,
# plain-English phrasing), so a model that only memorised the training templates does visibly worse here.
OOD_TEMPLATES: dict[str, tuple[str, ...]] = {
    "indemnification_carve_out": (
        "Excluded from the indemnity given by {p1} to {p2}: (a) Losses caused by the negligence of {p2}; "
        "(b) claims first asserted after {date1}; and (c) any amount in excess of {amt1}.",
    ),
    "limitation_of_liability": (
        "Liability cap. {amt1} is the most that {p1} can ever be required to pay the Customer, whatever the "
        "cause of action; from {date1} onward that cap rises to {amt2}.",
    ),
    "material_adverse_change": (
        "Should {p1} suffer any event that wipes out more than {amt1} of its net assets within {dur1}, {p2} "
        "is released from its commitment, and the parties agree that this is a material adverse change.",
    ),
    "termination": (
        "Termination rights. {p2}: on {dur1} notice, for any reason. {p1}: at once, if {p2} becomes "
        "insolvent or misses a payment of {amt1}. Neither party may terminate before {date1}.",
    ),
    "confidentiality": (
        "Whatever {p2} learns about the customers of {p1} stays secret: no copying, no sharing and no use "
        "outside the Project, until {date1} or for {dur1} after the last disclosure, whichever is later.",
    ),
    "governing_law": (
        "Disputes between {p1} and {p2} go to the courts of {law}, whose laws govern this Agreement in "
        "every respect, including its formation and any non-contractual obligations.",
    ),
}

TRAIN_JURISDICTIONS = ("the State of Delaware", "the State of New York", "the State of California",
                       "England and Wales", "the State of Texas", "the Commonwealth of Massachusetts",
                       "Scotland", "Ireland")
OOD_JURISDICTIONS = ("the Province of Ontario", "the Republic of Singapore", "the State of New South Wales",
                     "the Hong Kong Special Administrative Region", "the Canton of Zurich")

# Company names are built from parts so that train and test share few exact names (the model must copy, not
# recall): 32 * (24 + 1) * 10 = 8,000 possible names.
NAME_FIRST = ("Northwind", "Bluestone", "Harborview", "Ironclad", "Silverline", "Redwood", "Crestmont",
              "Lakeshore", "Granite", "Summit", "Oakridge", "Brightwater", "Falcon", "Meridian", "Pinecrest",
              "Westgate", "Evergreen", "Copperfield", "Highland", "Stonebridge", "Riverton", "Aurora",
              "Blackrock", "Clearview", "Fairhaven", "Goldleaf", "Kingsbury", "Larkspur", "Maplewood",
              "Newhaven", "Orchard", "Whitfield")
NAME_SECOND = ("Analytics", "Logistics", "Capital", "Biotech", "Software", "Energy", "Holdings", "Media",
               "Robotics", "Foods", "Pharma", "Systems", "Partners", "Industries", "Networks", "Materials",
               "Health", "Freight", "Labs", "Ventures", "Semiconductors", "Retail", "Aerospace", "Textiles")
NAME_SUFFIX = ("Inc.", "LLC", "Ltd.", "plc", "Corp.", "GmbH", "LLP", "S.A.", "Limited", "B.V.")

CURRENCIES = ("${}", "USD {}", "EUR {}", "\u00a3{}", "GBP {}", "\u20ac{}")
AMOUNT_BASES = (25_000, 50_000, 75_000, 100_000, 150_000, 250_000, 500_000, 750_000, 1_000_000, 1_500_000,
                2_000_000, 2_500_000, 5_000_000, 10_000_000)
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
NUMBER_WORDS = {2: "two", 3: "three", 5: "five", 6: "six", 7: "seven", 10: "ten", 12: "twelve", 14: "fourteen",
                15: "fifteen", 18: "eighteen", 24: "twenty-four", 30: "thirty", 36: "thirty-six", 45: "forty-five",
                60: "sixty", 90: "ninety", 120: "one hundred twenty", 180: "one hundred eighty"}
DURATION_COUNTS = {"days": (5, 7, 10, 14, 15, 30, 45, 60, 90, 120, 180), "months": (3, 6, 12, 18, 24, 36),
                   "years": (2, 3, 5, 7, 10)}


# ------------------------------------------------------------------------------------------ value samplers
def _party(rng: random.Random) -> str:
    # Half the names drop the middle part ("Falcon Ltd."): real names vary in length, and it keeps examples short.
    middle = f" {rng.choice(NAME_SECOND)}" if rng.random() < 0.5 else ""
    return f"{rng.choice(NAME_FIRST)}{middle} {rng.choice(NAME_SUFFIX)}"


def _amount(rng: random.Random) -> str:
    value = rng.choice(AMOUNT_BASES) * rng.choice((1, 1, 1, 2, 3))
    return rng.choice(CURRENCIES).format(f"{value:,}")


def _date(rng: random.Random) -> str:
    year, month, day = rng.randint(2019, 2031), rng.randint(1, 12), rng.randint(1, 28)
    style = rng.randrange(3)
    if style == 0:
        return f"{MONTHS[month - 1]} {day}, {year}"
    if style == 1:
        return f"{day} {MONTHS[month - 1]} {year}"
    return f"{year:04d}-{month:02d}-{day:02d}"


def _duration(rng: random.Random) -> str:
    unit = rng.choice(tuple(DURATION_COUNTS))
    count = rng.choice(DURATION_COUNTS[unit])
    style = rng.randrange(3)
    if style == 0 and count in NUMBER_WORDS:  # the drafting style "thirty (30) days"
        return f"{NUMBER_WORDS[count]} ({count}) {unit}"
    if style == 1 and count in NUMBER_WORDS:
        return f"{NUMBER_WORDS[count]} {unit}"
    return f"{count} {unit}"


SAMPLERS = {"p": _party, "amt": _amount, "date": _date, "dur": _duration}
FIELD_OF_SLOT = {"p": "parties", "amt": "amounts", "date": "dates", "dur": "durations", "law": "governing_law"}


def template_slots(template: str) -> list[str]:
    """Slot names in order of appearance, repeats kept (e.g. ['p1', 'p2', 'p1', 'amt1'])."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def template_regex(template: str) -> re.Pattern[str]:
    """A pattern that full-matches exactly the texts this template can render (used to tell templates apart)."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name:
            parts.append(".+?")
    return re.compile("".join(parts), re.DOTALL)


# ------------------------------------------------------------------------------------------------ render
def render(clause_type: str, template: str, rng: random.Random,
           jurisdictions: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """Fill a template; return (clause text, answer dict with KEYS in fixed order, values verbatim)."""
    slots = template_slots(template)
    values: dict[str, str] = {}
    for slot in dict.fromkeys(slots):  # distinct slots, first-appearance order
        kind = slot.rstrip("0123456789")
        if kind == "law":
            values[slot] = rng.choice(jurisdictions)
            continue
        value = SAMPLERS[kind](rng)
        # Same-kind slots must differ, else the extracted list would silently lose an entry.
        while value in values.values():
            value = SAMPLERS[kind](rng)
        values[slot] = value
    text = template.format(**values)
    answer: dict[str, Any] = {"clause_type": clause_type, "parties": [], "amounts": [], "dates": [],
                              "durations": [], "governing_law": None}
    for slot in slots:
        key, value = FIELD_OF_SLOT[slot.rstrip("0123456789")], values[slot]
        if key == "governing_law":
            # "the laws of the State of Delaware" -> "State of Delaware": the name, still a verbatim span.
            answer[key] = value.removeprefix("the ")
        elif value not in answer[key]:
            answer[key].append(value)
    return text, answer


def answer_json(answer: dict[str, Any]) -> str:
    """Compact one-line JSON, fixed key order (KEYS), non-ASCII kept as written so spans stay verbatim."""
    return json.dumps({key: answer[key] for key in KEYS}, ensure_ascii=False, separators=(", ", ": "))


def make_split(split: str, n: int, seed: int, seen: set[str]) -> list[dict[str, Any]]:
    """n records for one split, clause types balanced (counts differ by <= 1), texts not in `seen` (updated).

    Each split has its own RNG seeded from (seed, split) so that, e.g., changing n_train leaves the other
    splits' distributions alone (their exact texts can still shift because cross-split duplicates are redrawn).
    """
    rng = random.Random(f"contracts:{seed}:{split}")
    templates = OOD_TEMPLATES if split == "ood" else TEMPLATES
    jurisdictions = OOD_JURISDICTIONS if split == "ood" else TRAIN_JURISDICTIONS
    types = [CLAUSE_TYPES[i % len(CLAUSE_TYPES)] for i in range(n)]
    rng.shuffle(types)
    records = []
    for clause_type in types:
        for _attempt in range(1000):
            text, answer = render(clause_type, rng.choice(templates[clause_type]), rng, jurisdictions)
            if text not in seen:
                break
        else:
            raise RuntimeError(f"split '{split}': could not draw a new unique '{clause_type}' clause after "
                               "1000 tries; lower the split sizes or add name parts/templates")
        seen.add(text)
        records.append({"messages": [{"role": "system", "content": SYSTEM},
                                     {"role": "user", "content": text},
                                     {"role": "assistant", "content": answer_json(answer)}]})
    return records


def _write_jsonl_atomic(path: Path, records: list[dict[str, Any]]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def generate(out_dir: str | Path, seed: int = 0, n_train: int = 1000, n_validation: int = 100,
             n_test: int = 100, n_ood: int = 100) -> dict[str, Any]:
    """Write train/validation/test/ood .jsonl under out_dir; return {"paths": {split: path}, "counts": {...}}."""
    sizes = {"train": n_train, "validation": n_validation, "test": n_test, "ood": n_ood}
    for split, n in sizes.items():
        if n < 1:
            raise ValueError(f"n_{split} must be >= 1, got {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    paths, counts = {}, {}
    for split in SPLITS:
        records = make_split(split, sizes[split], seed, seen)
        path = out / f"{split}.jsonl"
        _write_jsonl_atomic(path, records)
        paths[split], counts[split] = str(path), len(records)
    assert len(seen) == sum(counts.values()), "duplicate clause text across splits"
    return {"paths": paths, "counts": counts, "seed": seed}


# ------------------------------------------------------------------------------------------ token stats
def token_stats(paths: dict[str, str], tokenizer_dir: str | Path) -> dict[str, dict[str, float]]:
    """Per split: mean/max tokens of the clause, of the JSON answer and of the full chat-template rendering."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    stats = {}
    for split, path in paths.items():
        rows = [json.loads(line)["messages"] for line in Path(path).read_text(encoding="utf-8").splitlines()]
        lengths = {
            "clause": [len(tokenizer(m[1]["content"])["input_ids"]) for m in rows],
            "json": [len(tokenizer(m[2]["content"])["input_ids"]) for m in rows],
            # The template already writes its special tokens; adding them again would double-count.
            "full": [len(tokenizer(tokenizer.apply_chat_template(m, tokenize=False),
                                   add_special_tokens=False)["input_ids"]) for m in rows],
        }
        stats[split] = {f"{name}_{agg}": round(fn(values), 1) for name, values in lengths.items()
                        for agg, fn in (("mean", lambda v: sum(v) / len(v)), ("max", max))}
    return stats


REFERENCE_TOKENIZER = Path.home() / ".cache/tunesmith/models/HuggingFaceTB--SmolLM2-135M-Instruct"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/contracts", help="output folder (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed gives identical files")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-validation", type=int, default=100)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--n-ood", type=int, default=100)
    parser.add_argument("--stats", action="store_true",
                        help=f"print token lengths with the tokenizer at --tokenizer (default {REFERENCE_TOKENIZER})")
    parser.add_argument("--tokenizer", default=str(REFERENCE_TOKENIZER))
    args = parser.parse_args(argv)
    result = generate(args.out, args.seed, args.n_train, args.n_validation, args.n_test, args.n_ood)
    for split in SPLITS:
        print(f"{split:<11} {result['counts'][split]:>6}  {result['paths'][split]}")
    if args.stats:
        for split, row in token_stats(result["paths"], args.tokenizer).items():
            print(f"{split:<11} " + "  ".join(f"{key}={value}" for key, value in row.items()))


if __name__ == "__main__":
    main()
