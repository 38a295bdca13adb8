"""Secure aggregation building blocks (Bonawitz et al., CCS 2017), on ``cryptography``.

* :mod:`common.secagg.encoding`: stochastic fixed-point encoding into the ring Z_{2^64},
  with the number of fractional bits sized so that the sum of every node's value cannot wrap.
* :mod:`common.secagg.crypto`: X25519 key agreement + HKDF-SHA256 seeds, AES-GCM boxes for
  the secret shares, an AES-256-CTR mask generator, and threshold secret sharing (Flower's
  Shamir helpers over pycryptodome, which Flower itself depends on).
* :mod:`common.secagg.masking`: masks a node adds to its vector, and those the coordinator
  removes from the sum of the survivors' vectors.
* :mod:`common.secagg.params`: who must survive (threshold, minimum survivors).

Privacy caveat: the protocol hides each node's vector from the coordinator only while fewer
than ``threshold`` parties collude and the coordinator follows the protocol when it names the
dropped nodes (a node answers the unmasking request once per session, and never reveals both
shares of one peer). The sum itself is released in the clear: with two survivors each one can
compute the other's contribution from it, hence the minimum number of survivors.
"""
