//! The conformance suites: the same tests for every implementation of a
//! storage seam. A backend calls [`blob_store`] (and [`owned_store`] if it
//! has that capability) or [`record_store`] from one test; an
//! implementation added later gets the whole suite by doing so.
//!
//! Backends do not special-case the empty blob (the [`Cas`](crate::Cas)
//! handle does), so the suites never store it.

use bytes::Bytes;
use kiln_proto::Digest;

use crate::records::{RecordStore, key};
use crate::store::{BlobStore, OwnedStore};
use crate::verify::{Upload, VerifiedBlob};

fn blob(seed: u8, len: usize) -> Bytes {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8))
        .collect::<Vec<u8>>()
        .into()
}

/// Everything a [`BlobStore`] promises. `store` must start empty.
pub async fn blob_store<S: BlobStore + ?Sized>(store: &S) {
    let small = VerifiedBlob::from_data(blob(1, 100));
    let medium = VerifiedBlob::from_data(blob(2, 64 << 10));
    let absent = Digest::of(b"never stored");

    // Absent blobs: reads are None, find_missing lists them.
    let got = store.get_many(&[absent]).await;
    assert_eq!(got.len(), 1);
    assert!(got[0].as_ref().unwrap().is_none(), "absent blob was found");
    assert!(store.read(&absent, 0).await.unwrap().is_none());

    // Batch put, one result per blob, then batch get in request order.
    let results = store.put_many(vec![small.clone(), medium.clone()]).await;
    assert_eq!(results.len(), 2);
    for r in results {
        r.unwrap();
    }
    let got = store
        .get_many(&[medium.digest(), absent, small.digest()])
        .await;
    assert_eq!(got.len(), 3);
    let got: Vec<Option<Bytes>> = got.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(got[0].as_ref(), Some(medium.data()));
    assert_eq!(got[1], None);
    assert_eq!(got[2].as_ref(), Some(small.data()));

    // Storing again is fine and changes nothing.
    for r in store.put_many(vec![small.clone()]).await {
        r.unwrap();
    }
    assert_eq!(
        store.get_many(&[small.digest()]).await[0]
            .as_ref()
            .unwrap()
            .as_ref(),
        Some(small.data())
    );

    // find_missing: absent ones only, in request order, duplicates kept.
    let other = Digest::of(b"also never stored");
    let missing = store
        .find_missing(&[other, small.digest(), absent, medium.digest(), other])
        .await
        .unwrap();
    assert_eq!(missing, vec![other, absent, other]);
    assert!(store.find_missing(&[]).await.unwrap().is_empty());

    // Streaming read from an offset.
    let reader = store.read(&medium.digest(), 1000).await.unwrap().unwrap();
    assert_eq!(reader.remaining(), medium.digest().size() - 1000);
    let rest = reader.read_to_end().await.unwrap();
    assert_eq!(&rest[..], &medium.data()[1000..]);
    let at_end = store
        .read(&medium.digest(), medium.digest().size())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(at_end.remaining(), 0);

    // Streaming write: invisible until committed with a proof.
    let streamed = blob(3, 200 << 10);
    let d = Digest::of(&streamed);
    let mut up = Upload::new(d, store.write(&d).await.unwrap());
    for chunk in streamed.chunks(48 << 10) {
        up.append(Bytes::copy_from_slice(chunk)).await.unwrap();
        assert_eq!(store.find_missing(&[d]).await.unwrap(), vec![d]);
    }
    up.commit().await.unwrap();
    assert!(store.find_missing(&[d]).await.unwrap().is_empty());
    let read = store.read(&d, 0).await.unwrap().unwrap();
    assert_eq!(read.read_to_end().await.unwrap(), streamed);

    // A write that is dropped leaves nothing.
    let dropped = blob(4, 10 << 10);
    let dd = Digest::of(&dropped);
    let mut up = Upload::new(dd, store.write(&dd).await.unwrap());
    up.append(dropped.slice(..5000)).await.unwrap();
    drop(up);
    assert_eq!(store.find_missing(&[dd]).await.unwrap(), vec![dd]);

    // A write whose data does not match its digest never becomes visible.
    let claimed = Digest::of(&blob(5, 1000));
    let mut up = Upload::new(claimed, store.write(&claimed).await.unwrap());
    up.append(blob(6, 1000)).await.unwrap();
    assert!(up.commit().await.is_err(), "a mismatched upload committed");
    assert_eq!(store.find_missing(&[claimed]).await.unwrap(), vec![claimed]);
    assert!(
        store.get_many(&[claimed]).await[0]
            .as_ref()
            .unwrap()
            .is_none()
    );

    // Two writers of one blob: both succeed, one copy.
    let twice = blob(7, 30 << 10);
    let dt = Digest::of(&twice);
    let mut a = Upload::new(dt, store.write(&dt).await.unwrap());
    let mut b = Upload::new(dt, store.write(&dt).await.unwrap());
    a.append(twice.clone()).await.unwrap();
    b.append(twice.clone()).await.unwrap();
    a.commit().await.unwrap();
    b.commit().await.unwrap();
    assert_eq!(
        store.get_many(&[dt]).await[0].as_ref().unwrap().as_ref(),
        Some(&twice)
    );
}

/// Everything an [`OwnedStore`] adds. `store` must start empty.
pub async fn owned_store<S: OwnedStore + ?Sized>(store: &S) {
    assert!(store.owned().is_some(), "an OwnedStore must offer itself");
    let start = store.usage();
    assert_eq!((start.blobs, start.bytes), (0, 0));
    let a = VerifiedBlob::from_data(blob(10, 300));
    let b = VerifiedBlob::from_data(blob(11, 70 << 10));
    for r in store.put_many(vec![a.clone(), b.clone()]).await {
        r.unwrap();
    }
    let usage = store.usage();
    assert_eq!(usage.blobs, 2);
    assert_eq!(usage.bytes, 300 + (70 << 10));

    let mut held: Vec<Digest> = store
        .inventory()
        .await
        .unwrap()
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    held.sort();
    let mut want = vec![a.digest(), b.digest()];
    want.sort();
    assert_eq!(held, want);

    // Deleting removes; absent digests are ignored.
    store
        .delete(&[a.digest(), Digest::of(b"not there")])
        .await
        .unwrap();
    assert!(
        store.get_many(&[a.digest()]).await[0]
            .as_ref()
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store.find_missing(&[a.digest()]).await.unwrap(),
        vec![a.digest()]
    );
    let usage = store.usage();
    assert_eq!((usage.blobs, usage.bytes), (1, 70 << 10));
    let held: Vec<Digest> = store
        .inventory()
        .await
        .unwrap()
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    assert_eq!(held, vec![b.digest()]);

    // A deleted blob can be stored again.
    for r in store.put_many(vec![a.clone()]).await {
        r.unwrap();
    }
    assert_eq!(
        store.get_many(&[a.digest()]).await[0]
            .as_ref()
            .unwrap()
            .as_ref(),
        Some(a.data())
    );
}

/// Everything a [`RecordStore`] promises. `store` must start empty.
pub async fn record_store<R: RecordStore + ?Sized>(store: &R) {
    let k1 = key("ac", "", "abcdef-3");
    let k2 = key("ac", "ci/linux", "abcdef-3");
    let k3 = key("asset", "", "00");
    assert_eq!(store.get(&k1).await.unwrap(), None);
    store.delete(&k1).await.unwrap();

    store.put(&k1, Bytes::from_static(b"one")).await.unwrap();
    store.put(&k2, Bytes::from_static(b"two")).await.unwrap();
    store.put(&k3, Bytes::new()).await.unwrap();
    assert_eq!(store.get(&k1).await.unwrap().as_deref(), Some(&b"one"[..]));
    // Instances do not share records.
    assert_eq!(store.get(&k2).await.unwrap().as_deref(), Some(&b"two"[..]));
    // An empty record is present, not absent.
    assert_eq!(store.get(&k3).await.unwrap().as_deref(), Some(&b""[..]));

    store.put(&k1, Bytes::from_static(b"uno")).await.unwrap();
    assert_eq!(store.get(&k1).await.unwrap().as_deref(), Some(&b"uno"[..]));

    store.delete(&k1).await.unwrap();
    assert_eq!(store.get(&k1).await.unwrap(), None);
    assert_eq!(store.get(&k2).await.unwrap().as_deref(), Some(&b"two"[..]));

    let big = blob(20, 1 << 20);
    store.put(&k1, big.clone()).await.unwrap();
    assert_eq!(store.get(&k1).await.unwrap(), Some(big));
}
