#!/usr/bin/env python3
"""Writes the seed corpus: a handful of valid inputs per fuzz target.

Run from anywhere: `python3 fuzz/seeds/generate.py`. The output (seeds/<target>/<name>) is
committed; re-running rewrites the same files.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def s(b):
    if isinstance(b, str):
        b = b.encode()
    return struct.pack(">H", len(b)) + b


def packet(header, body):
    return bytes([header]) + varint(len(body)) + body


def props(*items):
    body = b"".join(items)
    return varint(len(body)) + body


def p_byte(i, v):
    return bytes([i, v])


def p_u16(i, v):
    return bytes([i]) + struct.pack(">H", v)


def p_u32(i, v):
    return bytes([i]) + struct.pack(">I", v)


def p_str(i, v):
    return bytes([i]) + s(v)


def p_pair(k, v):
    return bytes([0x26]) + s(k) + s(v)


def connect(level, name=b"MQTT", client_id="dev-1", clean=True, keep_alive=30, will=None,
            user=None, password=None, v5_props=b"", will_props=b""):
    flags = 0
    if clean:
        flags |= 0x02
    if will:
        topic, payload, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
    if user is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    body = s(name) + bytes([level, flags]) + struct.pack(">H", keep_alive)
    if level == 5:
        body += props(v5_props)
    body += s(client_id)
    if will:
        if level == 5:
            body += props(will_props)
        body += s(topic) + s(payload)
    if user is not None:
        body += s(user)
    if password is not None:
        body += s(password)
    return packet(0x10, body)


def publish(topic, payload, qos=0, pkid=1, retain=False, dup=False, v5=None):
    header = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    body = s(topic)
    if qos:
        body += struct.pack(">H", pkid)
    if v5 is not None:
        body += props(v5)
    return packet(header, body + payload)


def subscribe(pkid, filters, v5=None):
    body = struct.pack(">H", pkid)
    if v5 is not None:
        body += props(v5)
    for f, opts in filters:
        body += s(f) + bytes([opts])
    return packet(0x82, body)


def unsubscribe(pkid, filters, v5=None):
    body = struct.pack(">H", pkid)
    if v5 is not None:
        body += props(v5)
    for f in filters:
        body += s(f)
    return packet(0xA2, body)


def ack(kind, pkid, reason=None):
    flags = 0x02 if kind == 6 else 0
    body = struct.pack(">H", pkid) + (bytes([reason]) if reason is not None else b"")
    return packet((kind << 4) | flags, body)


PINGREQ = bytes([0xC0, 0])
DISCONNECT = bytes([0xE0, 0])
DISCONNECT_V5_WILL = bytes([0xE0, 2, 0x04, 0])

mqtt = {
    "connect_v311_will_user_pass": connect(
        4, client_id="pump-1", clean=False, will=("device/pump-1/status", b"offline", 1, True),
        user="pump-1", password=b"s3cret"),
    "connect_v31_mqisdp": connect(3, name=b"MQIsdp", client_id="old", user="u", password=b"p"),
    "connect_v311_minimal": connect(4, client_id=""),
    "connect_v5_will_user_pass": connect(
        5, client_id="pump-2", keep_alive=60,
        will=("device/pump-2/status", b"gone", 2, False), user="pump-2", password=b"pw",
        v5_props=p_u32(0x11, 3600) + p_u16(0x21, 20) + p_u32(0x27, 65536)
        + p_u16(0x22, 10) + p_byte(0x17, 1) + p_pair("k", "v"),
        will_props=p_u32(0x18, 5) + p_byte(0x01, 1) + p_str(0x03, "text/plain")
        + p_str(0x08, "device/pump-2/reply") + bytes([0x09]) + s(b"\x01\x02") + p_u32(0x02, 60)),
    "connect_v5_auth_method": connect(5, client_id="a", v5_props=p_str(0x15, "SCRAM")),
    "publish_v311_qos0": publish("device/pump-1/telemetry", b'{"temp":21.5}'),
    "publish_v311_qos1_retain": publish("device/pump-1/status", b"online", qos=1, pkid=7,
                                        retain=True),
    "publish_v311_qos2_dup": publish("a/b", b"\x00\xff\x10", qos=2, pkid=65535, dup=True),
    "publish_v311_retained_clear": publish("device/pump-1/status", b"", qos=1, retain=True),
    "publish_v5_qos0_no_props": publish("a/b", b"hello", v5=b""),
    "publish_v5_qos1_props": publish(
        "device/pump-1/telemetry", b'{"temp":1}', qos=1, pkid=3,
        v5=p_byte(0x01, 1) + p_u32(0x02, 30) + p_str(0x03, "application/json")
        + p_str(0x08, "reply/here") + bytes([0x09]) + s(b"corr") + p_pair("key", "value")),
    "publish_v5_qos2_user_props": publish("x", b"p", qos=2, pkid=9,
                                          v5=p_pair("a", "1") + p_pair("b", "2")),
    "subscribe_v311": subscribe(1, [("device/+/telemetry", 1), ("device/pump-1/#", 2),
                                    ("$share/g/a/#", 0)]),
    "subscribe_v5_options": subscribe(2, [("device/pump-1/commands", 0x2D), ("#", 0x04)],
                                      v5=bytes([0x0B, 0x05]) + p_pair("k", "v")),
    "unsubscribe_v311": unsubscribe(3, ["device/+/telemetry", "$share/g/a/#"]),
    "unsubscribe_v5": unsubscribe(4, ["a/b"], v5=p_pair("k", "v")),
    "pingreq": PINGREQ,
    "disconnect_v311": DISCONNECT,
    "disconnect_v5_with_will": DISCONNECT_V5_WILL,
    "acks": ack(4, 7) + ack(5, 9) + ack(6, 9) + ack(7, 9) + ack(4, 8, 0x10),
}
mqtt["session_v311"] = (mqtt["connect_v311_will_user_pass"] + mqtt["subscribe_v311"]
                        + mqtt["publish_v311_qos1_retain"] + ack(4, 1) + PINGREQ
                        + mqtt["unsubscribe_v311"] + DISCONNECT)
mqtt["session_v5"] = (mqtt["connect_v5_will_user_pass"] + mqtt["subscribe_v5_options"]
                      + mqtt["publish_v5_qos1_props"] + mqtt["publish_v5_qos2_user_props"]
                      + ack(6, 9) + PINGREQ + mqtt["unsubscribe_v5"] + DISCONNECT_V5_WILL)
# ACL inputs (identity line, then a topic or filter) and envelope payloads.
mqtt["acl_device_publish"] = b"pump-1\ndevice/pump-1/telemetry"
mqtt["acl_share_filter"] = b"pump-1\n$share/g/device/+/alerts"
mqtt["acl_client_prefix"] = b"cid\nclients/cid/x/in"
mqtt["envelope_plain_qos1"] = b"\xe1hello"
mqtt["envelope_props_qos2"] = b"\xe6" + props(p_pair("k", "v")) + b"payload"

bridge = {
    "connect_full": '{"op": "connect", "client_id": "console-7", "clean": false, "keep_alive": 60,'
                    ' "username": "alice", "password": "s3cret", "will": {"topic":'
                    ' "consoles/console-7/state", "payload": "offline", "qos": 1, "retain": true}}',
    "connect_token": '{"op":"connect","token":"eyJhbGciOi.x.y","ref":"c1"}',
    "disconnect": '{"op": "disconnect"}',
    "ping": '{"op": "ping", "ref": 1}',
    "subscribe": '{"op": "subscribe", "ref": 3, "filters": [{"filter": "device/+/alerts", "qos": 1},'
                 ' {"filter": "device/pump-1/#", "qos": 2}]}',
    "unsubscribe": '{"op": "unsubscribe", "ref": 4, "filters": ["device/pump-1/#"]}',
    "publish_json": '{"op": "publish", "topic": "device/pump-1/commands", "payload": {"cmd": "stop"},'
                    ' "qos": 1, "id": 17, "retain": false}',
    "publish_utf8": '{"op":"publish","topic":"a/b","payload":"hello","encoding":"utf8","qos":0}',
    "publish_base64": '{"op":"publish","topic":"a/b","payload":"AAEC/w","encoding":"base64",'
                      '"qos":2,"id":5,"dup":true}',
    "publish_refused_qos1": '{"op":"publish","topic":"a/+","qos":1,"id":9}',
    "acks": '{"op": "puback", "id": 17}',
    "pubrel": '{"op": "pubrel", "id": 17}',
    "pubrec": '{"op":"pubrec","id":65535}',
    "pubcomp": '{"op":"pubcomp","id":1}',
    "bad_ref": '{"op":"ping","ref":[1]}',
}
# Outbound seeds for frames::message: flags byte, id (2 bytes), topic, 0xFF, payload.
bridge_bin = {
    "message_json": b"\x11\x00\x05device/pump-1/alerts\xff" + b'{"type":"ALERT","severity":"HIGH"}',
    "message_utf8": b"\x00\x00\x00a/b\xffhello \"world\"\n",
    "message_binary": b"\x22\x12\x34a/\x01b\xff\x00\x80\xfe",
}

telemetry = {
    "flat": '{"temperature": 21.5, "pressure": 1.2, "timestamp": 1700000000}',
    "flat_ms_device": '{"device_id": "pump-1", "vibration": 0.02, "timestamp": 1699999999123}',
    "tagged": '{"timestamp": "2023-11-14T22:13:20.5Z", "values": [{"tag": "rpm", "value": 1450},'
              ' {"name": "temp", "value": 40.1}]}',
    "batch": '{"type": "batch", "deviceId": "pump-1", "data": [{"temp": 1, "timestamp":'
             ' "2023-11-14 22:00:00+01:00"}, {"temp": 2}]}',
    "nan_word": '{"values": [{"tag": "x", "value": "NaN"}]}',
    "datetime": '2023-11-14T22:13:20.123+02:00',
}


def write(target, name, content):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(content, str):
        content = content.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(content)


for k, v in mqtt.items():
    write("mqtt_packets", k, v)
for k, v in {**bridge, **bridge_bin}.items():
    write("bridge_frames", k, v)
for k, v in telemetry.items():
    write("telemetry_json", k, v)
