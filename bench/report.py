"""What every bench ends with: its JSON report on stdout, and the same text in --out when given."""
import json


def print_report(report: dict, out: str = "", indent: int = 1) -> None:
    text = json.dumps(report, indent=indent)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
