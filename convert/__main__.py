import argparse
import sys

from .convert import convert


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert", description="Convert an HF MoE checkpoint "
                                "(config.json + safetensors) into a rewire-jax orbax checkpoint.")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="dtype of the stored params (default bfloat16)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        out = convert(a.hf_dir, a.out_dir, a.dtype, a.overwrite, progress=not a.no_progress)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
