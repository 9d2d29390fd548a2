"""For tests/test_scale.py: almost.sft_train on a dialogue file, run alone or under torchrun.

    python tests/sft_driver.py DATA OUT BASE [--flag=value ...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from almost import Config, sft_train  # noqa: E402
from rm import end_distributed  # noqa: E402
from sample import parse_args, run_cli  # noqa: E402


def main(argv):
    data, out, base, *flags = argv
    sft_train(parse_args(Config, flags), data, out, base)
    end_distributed()


if __name__ == "__main__":
    run_cli(main)
