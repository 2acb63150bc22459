"""Random Client Selection, the paper's baseline for Meerkat-VP (Sec. 3.3): the same calibration
round and detection give the NUMBER n of clients VP would flag; the server early-stops n
clients drawn uniformly from all clients (seeded: mix(seed, RANDOM_SELECT, round)), flagged
or not. With partial participation the count grows as clients calibrate, and each growth draws the missing
number among the clients not yet stopped. It reads the same settings as Meerkat-VP."""

import numpy as np

from fedmeerkat.federated.methods.vp import VPServer, VPSettings, vp_client
from fedmeerkat.federated.registry import Method, register
from fedmeerkat.zo.seeds import RANDOM_SELECT, mix


class RandomSelectServer(VPServer):
    method = "meerkat-random-select"
    selection = "random"

    def _select(self, round_idx: int) -> None:
        need = len(self.detected) - len(self.stopped)
        if need <= 0:
            return
        pool = [k for k in range(self.num_clients) if k not in self.stopped]
        rng = np.random.default_rng(mix(self.settings.seed, RANDOM_SELECT, round_idx))
        picked = rng.choice(pool, size=need, replace=False)
        self.stopped = sorted(self.stopped + [int(k) for k in picked])


METHOD = register(Method(
    "meerkat-random-select", server=RandomSelectServer, settings=VPSettings, order=2,
    client=vp_client,
    server_options=lambda s: {"vp": s},
    summary="early-stops as many clients as VP would, at random", reference="paper Sec. 3.3 baseline"))
