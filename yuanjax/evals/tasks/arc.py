"""ARC-Challenge as Yuan2.0-M32 evaluates it: 25-shot `Question:`/`Answer:` prompt, answer letter.

Data: datasets/ARC/ARC_challenge.txt (2,344 lines `question<n>A.x<n>B.y<n>C.z<n>D.w[SEP]C`;
Yuan's file joins ARC-Challenge's test and validation splits). The letter is read as
tasks/ARC/score_arc.py reads it (`choice.letter`); the item is right when it equals the gold.
"""
from yuanjax.evals import task
from yuanjax.evals.tasks import choice


@task.register
class ARC(choice.ChoiceTask):
  name = 'arc'
  data_file = 'ARC_challenge.txt'
  shots = 'arc'
