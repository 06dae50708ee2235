"""Print the words given on the command line."""

import argparse


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("words", nargs="+")
    args = parser.parse_args(argv)
    text = " ".join(args.words)
    print(text)


if __name__ == "__main__":
    main()
