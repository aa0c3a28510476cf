"""Run by tests/test_conversation_state.py in a subprocess: two turns, save, then keep re-saving
the same state (atomic overwrites) until the test kills the process with SIGKILL."""
import sys

from conversation_helpers import NEW, OPTS, TEMPLATE, TURNS, demo_model
from rewire_jax import Conversation

out = sys.argv[1]
conv = Conversation(demo_model(), OPTS, system="tiny helpers", chat_template=TEMPLATE)
for text in TURNS[:2]:
    conv.reply(text, NEW)
conv.save(out)
print("SAVED", flush=True)
while True:   # killed at any moment of a save: the directory must hold a whole state
    conv.save(out)
