"""The files gefl-edge ships beside its code: the default and paper configs, the tier catalogue
(tiers.yaml), the device profiles (devices.yaml), JSON schemas, a Mosquitto config and ACL, and a
systemd unit for a board's client.

This folder is where a person reads them in the repository; it installs as the package data of
`gefl.configs`, so an installed wheel finds them through `gefl.resources` without a checkout.
"""
