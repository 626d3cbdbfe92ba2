"""Command line: python -m feedback_alignment {prepare,train,select,evaluate,summarize,figures,bench} ..."""
import importlib
import sys

COMMANDS = {
    "prepare": "prepare the dataset cache (download, check, split)",
    "train": "train one run",
    "select": "choose a tuning group's point of the sweep on validation error",
    "evaluate": "test error of a run's best-validation weights",
    "summarize": "aggregate runs into summary.csv (mean and spread over seeds)",
    "figures": "draw the figures from the aggregated results",
    "bench": "time a training step per rule against plain backprop",
}

MODULES = {"select": "tuning"}  # commands whose module has another name


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        lines = "\n".join(f"  {name:10s} {text}" for name, text in COMMANDS.items())
        sys.exit(f"usage: python -m feedback_alignment COMMAND [options]\n\ncommands:\n{lines}")
    command = sys.argv[1]
    module = MODULES.get(command, command)
    importlib.import_module(f"feedback_alignment.{module}").main(sys.argv[2:])


if __name__ == "__main__":
    main()
