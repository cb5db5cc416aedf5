"""What every package of this project shares and nothing else: the user-error type, the CLI wrapper that
prints it as one line, and atomic, deterministic file writes (hs3.io). data_prep, recipes, eval and its all
import it; it imports none of them."""
