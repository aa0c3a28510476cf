import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert an HF MoE checkpoint (config.json + safetensors) into a rewire-jax orbax "
                    "checkpoint, or (--to-hf) an HF or converted directory into an HF directory.")
    p.add_argument("src", metavar="SRC", help="HF model directory (or, with --to-hf, a converted one)")
    p.add_argument("out", metavar="OUT", help="directory to write (appears atomically)")
    p.add_argument("--to-hf", action="store_true",
                   help="write an HF directory (config.json, model.safetensors in the hub's key layout, "
                        "tokenizer) that transformers' from_pretrained and rewire_jax.load both read")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="dtype of the stored params (default: bfloat16; with --to-hf the source's)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true")
    from rewire_jax import distributed
    distributed.add_arguments(p)
    a = p.parse_args(argv)
    from rewire_jax.api import import_transformers
    import_transformers()   # quietly: no "PyTorch was not found" notice
    from rewire_jax.io.convert import to_converted, to_hf
    from rewire_jax import distributed
    distributed.from_args(a)
    try:
        if a.to_hf:
            out = to_hf(a.src, a.out, a.dtype, a.overwrite)
        else:
            out = to_converted(a.src, a.out, a.dtype or "bfloat16", a.overwrite, progress=not a.no_progress,
                               mesh=a.mesh)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    distributed.main_print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
